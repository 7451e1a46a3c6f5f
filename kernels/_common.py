"""What the Triton kernels' launch code shares: interpreter detection, accumulator type, launch
device, and host-side integer helpers."""

import contextlib
import os

import torch
import triton.language as tl

from fnevr.ops._codes import Activation, Mode, Padding

# The op codes (fnevr/ops/_codes.py, the one table) as constants the kernels compare against.
RELU: tl.constexpr = tl.constexpr(int(Activation.RELU))
LEAKY_RELU: tl.constexpr = tl.constexpr(int(Activation.LEAKY_RELU))
SOFTPLUS: tl.constexpr = tl.constexpr(int(Activation.SOFTPLUS))
BILINEAR: tl.constexpr = tl.constexpr(int(Mode.BILINEAR))
NEAREST: tl.constexpr = tl.constexpr(int(Mode.NEAREST))
BORDER: tl.constexpr = tl.constexpr(int(Padding.BORDER))
REFLECTION: tl.constexpr = tl.constexpr(int(Padding.REFLECTION))


# Read once, as triton.jit does when it decides between compiling and interpreting a kernel.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NO_DEVICE = contextlib.nullcontext()


def interpreting() -> bool:
    """Running under TRITON_INTERPRET=1 (CPU tensors; numpy has no bf16, so bf16 goes through fp32)."""
    return _INTERPRETING


def accumulator(dtype: torch.dtype):
    """fp32 accumulation, fp64 for fp64 tensors."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_SMS: dict = {}


def multiprocessors(device: torch.device, interpreter: int) -> int:
    """Multiprocessors of `device`'s GPU (cached: launch code asks on every call). CPU tensors: the
    compile-only target's (FNEVR_TRITON_COMPILE_ONLY), else `interpreter`: a few, so that the
    interpreter tests' small shapes still take the many-program paths."""
    if device.type != "cuda":
        from .aot import MULTIPROCESSORS, requested_arch

        arch = requested_arch()
        return interpreter if arch is None else MULTIPROCESSORS.get(arch, 132)
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def launch_ctx(t: torch.Tensor):
    """Triton launches on the current device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else _NO_DEVICE


# Host-side twins of triton.cdiv and triton.next_power_of_2: those are constexpr functions, usable
# inside kernels, and cost about 10 us per host call (Triton 3.8 on this CPU) against 0.1 us here;
# every launch needs a few of them.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
