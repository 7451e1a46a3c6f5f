"""fnevr's fused ops. Each has a pure-PyTorch reference (the spec) and C++ CPU, CUDA C++ and
Triton kernels with their own backward passes, registered with torch.library.

Every op takes ``backend="auto" | "reference" | "cpu" | "cuda" | "triton"``; :func:`backends`
reports which can run here and, if not, why. The imports below are the registry's list of ops:
each op module registers itself (``fnevr/ops/_registry.py``; docs/CONTRIBUTING.md adds one).
"""

from ._fused import decompositions
from ._registry import BACKENDS, backends, ops
from .composite import composite, composite_reference
from .grid_sample import grid_sample, grid_sample_reference
from .mlp_composite import PARAMETERS as MLP_PARAMETERS
from .mlp_composite import mlp_composite, mlp_composite_reference
from .spade_norm import spade_norm, spade_norm_reference

__all__ = [
    "BACKENDS",
    "MLP_PARAMETERS",
    "backends",
    "composite",
    "composite_reference",
    "decompositions",
    "grid_sample",
    "grid_sample_reference",
    "mlp_composite",
    "mlp_composite_reference",
    "ops",
    "spade_norm",
    "spade_norm_reference",
]
