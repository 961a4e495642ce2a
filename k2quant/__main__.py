"""python -m k2quant: the command line."""

from .cli import main

main()
