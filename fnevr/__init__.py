"""fnevr: FNeVR face animation in PyTorch, with fused kernels for its hot paths."""

from . import (
    _extension,  # noqa: F401  (loads the compiled kernels, or warns once)
    nn,
    ops,
)
from ._version import __version__
from .animator import Animator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import load_config
from .dropin import PatchReport, PatchWarning, patch, patch_functional, unpatch
from .model import FNeVR

__all__ = [
    "Animator",
    "FNeVR",
    "PatchReport",
    "PatchWarning",
    "__version__",
    "load_checkpoint",
    "load_config",
    "nn",
    "ops",
    "patch",
    "patch_functional",
    "save_checkpoint",
    "unpatch",
]
