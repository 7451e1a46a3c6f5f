"""fnevr: FNeVR face animation in PyTorch, with fused kernels for its hot paths."""

from . import _extension  # noqa: F401  (loads the compiled kernels, or warns once)
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
