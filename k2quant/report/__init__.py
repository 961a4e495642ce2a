"""Accuracy diffs between a reference and a candidate model: metrics, collection, rendering."""
