"""Quantization schemes: pure, vectorized functions; no file I/O anywhere in here."""
