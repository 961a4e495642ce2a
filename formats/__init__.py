"""On-disk codecs (installed as k2quant.formats): readers and writers, no quantization."""
