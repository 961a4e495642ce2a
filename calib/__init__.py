"""Calibration (installed as k2quant.calib): data loading and layer-streamed statistics."""
