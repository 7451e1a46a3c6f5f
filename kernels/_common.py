"""What the Triton kernels share: interpreter detection, accumulator type, launch device."""

import contextlib
import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """Running under TRITON_INTERPRET=1 (CPU tensors; numpy has no bf16, so bf16 goes through fp32)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulator(dtype: torch.dtype):
    """fp32 accumulation, fp64 for fp64 tensors."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_ctx(t: torch.Tensor):
    """Triton launches on the current device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
