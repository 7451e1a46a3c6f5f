"""Loads fnevr's compiled kernels (fnevr._C for the CPU, fnevr._C_cuda for CUDA) if they were built.

Without them fnevr still works: `backend="auto"` falls back to the reference (pure PyTorch) or to
Triton, and one warning at import says so. FNEVR_NO_EXTENSION=1 skips loading them on purpose.
"""

import importlib
import os
import warnings

import torch


class ExtensionWarning(UserWarning):
    """fnevr's compiled kernels could not be loaded; slower fallbacks are used."""


def _load(name: str):
    if os.environ.get("FNEVR_NO_EXTENSION", "") not in ("", "0"):
        return None, "disabled by FNEVR_NO_EXTENSION=1"
    try:
        importlib.import_module(name)
        return True, ""
    except ImportError as err:  # not built, or built against another torch
        return None, f"{name} failed to import ({err}); rebuild with `pip install --no-build-isolation -e .`"


_cpu, cpu_reason = _load("fnevr._C")
cpu_available = _cpu is not None
if cpu_available:
    _cuda, cuda_reason = _load("fnevr._C_cuda")
else:
    _cuda, cuda_reason = None, f"needs the CPU extension, which is unavailable: {cpu_reason}"
cuda_built = _cuda is not None

if not cpu_available:
    warnings.warn(
        f"fnevr's compiled kernels are unavailable ({cpu_reason}); fused ops fall back to the "
        "pure-PyTorch reference on the CPU, and to Triton or the reference on CUDA.",
        ExtensionWarning,
        stacklevel=2,
    )


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and if not, why."""
    if not cuda_built:
        return False, cuda_reason or "fnevr._C_cuda was not built (torch without CUDA or nvcc not found at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""
