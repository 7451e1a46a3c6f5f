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
    device = torch.cuda.current_device()
    return arch_status(
        getattr(cuda, "cuda_archs", ""), torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    )


def _arch(code: str) -> tuple[int, int]:
    digits = "".join(c for c in code.split("_")[1] if c.isdigit())  # sm_90a -> 90, sm_120 -> 120
    return int(digits[:-1]), int(digits[-1])


def arch_status(archs: str, capability: tuple[int, int], gpu: str = "this GPU") -> tuple[bool, str]:
    """Whether GPU code built for `archs` ("sm_80,sm_90,compute_90": binaries and PTX) runs on a
    GPU of compute `capability`, and if not, why. A binary runs on its own major version from its
    minor version up (sm_80 on 8.0, 8.6, 8.9); PTX is compiled by the driver for any GPU from its
    version up."""
    codes = [c.strip() for c in archs.split(",") if c.strip()]
    if not codes:  # a module built before the list was recorded: let the launch tell
        return True, ""
    binaries = [_arch(c) for c in codes if c.startswith("sm_")]
    ptx = [_arch(c) for c in codes if c.startswith("compute_")]
    if any(a[0] == capability[0] and a[1] <= capability[1] for a in binaries) or any(a <= capability for a in ptx):
        return True, ""
    version = f"{capability[0]}.{capability[1]}"
    return False, (
        f"fnevr._C_cuda holds GPU code for {', '.join(codes)}, none of which runs on {gpu} (compute capability "
        f"{version}); rebuild with TORCH_CUDA_ARCH_LIST={version} (pip install --no-build-isolation .), or use "
        "the triton backend (backend='auto' does)"
    )
