"""fnevr: FNeVR face animation in PyTorch, with fused kernels for its hot paths."""

from . import (
    _extension,  # noqa: F401  (loads the compiled kernels, or warns once)
    nn,
    ops,
)
from .animator import Animator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import load_config
from .model import FNeVR

__version__ = "0.1.0"
__all__ = ["Animator", "FNeVR", "__version__", "load_checkpoint", "load_config", "nn", "ops", "save_checkpoint"]
