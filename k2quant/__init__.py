"""k2quant: quantize, check and run Kimi K2 on hardware people own."""

from .checkpoint import open_checkpoint
from .config import K2Config
from .errors import CheckpointError, ConfigError, K2QuantError
from .model import K2Model, open_model

__version__ = "0.1.0"
__all__ = ["open_model", "open_checkpoint", "K2Config", "K2Model", "K2QuantError", "CheckpointError", "ConfigError"]
