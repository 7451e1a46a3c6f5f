"""Loads fnevr's compiled kernels if they were built: ``cpu`` is the module fnevr._C (the CPU
kernels and every kernel schema), ``cuda`` the module fnevr._C_cuda (the CUDA kernels); each is
None when it cannot be loaded, with ``cpu_reason`` / ``cuda_reason`` saying why.

Why two modules: fnevr._C_cuda is built only where CUDA is at hand and links the CUDA runtime, so
a CPU-only build, or a machine without those libraries, still loads the CPU kernels; the schemas
live in fnevr._C alone, so both backends implement the same ones.

Without them fnevr still works: `backend="auto"` falls back to the reference (pure PyTorch) or to
Triton, and one warning at import says so. FNEVR_NO_EXTENSION=1 skips loading them on purpose.
"""

import importlib
import os
import warnings
from types import ModuleType

import torch


class ExtensionWarning(UserWarning):
    """fnevr's compiled kernels could not be loaded; slower fallbacks are used."""


def _load(name: str) -> tuple[ModuleType | None, str]:
    if os.environ.get("FNEVR_NO_EXTENSION", "") not in ("", "0"):
        return None, "disabled by FNEVR_NO_EXTENSION=1"
    try:
        return importlib.import_module(name), ""
    except ImportError as err:  # not built, or built against another torch
        return None, f"{name} failed to import ({err}); rebuild with `pip install --no-build-isolation -e .`"


cpu, cpu_reason = _load("fnevr._C")
if cpu is not None:
    cuda, cuda_reason = _load("fnevr._C_cuda")
else:
    cuda, cuda_reason = None, f"needs the CPU extension, which is unavailable: {cpu_reason}"

if cpu is None:
    warnings.warn(
        f"fnevr's compiled kernels are unavailable ({cpu_reason}); fused ops fall back to the "
        "pure-PyTorch reference on the CPU, and to Triton or the reference on CUDA.",
        ExtensionWarning,
        stacklevel=2,
    )


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and if not, why."""
    if cuda is None:
        return False, cuda_reason or "fnevr._C_cuda was not built (torch without CUDA or nvcc not found at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""
