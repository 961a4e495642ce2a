"""k2quant's local runner: K2 on one GPU plus RAM, or on the CPU alone (see runner.py)."""
