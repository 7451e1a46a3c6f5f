"""Which implementation of a fused op runs: availability of each backend, and `backend="auto"`;
and the custom ops' eager fast path (:func:`custom_op`).

Statuses are read once at import (Dynamo then sees constants, so resolving a backend inside
`torch.compile` costs no graph break). Set TRITON_INTERPRET before importing fnevr to use it.
"""

import importlib.util
import inspect
import os

import torch
from torch import Tensor

from .. import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = ("composite", "grid_sample", "spade_norm", "mlp_composite")
# What `auto` tries, fastest first, per op and device type; the reference is last. On the CPU the C++
# kernel. On CUDA each op's order is its own measurement (benchmarks/gpu_check.sh prints which
# backend won each op at FNeVR's shapes next to this choice):
# - composite: Triton (H100, 2026-11-24, benchmarks/results/composite-cuda-*-4325dc8.txt: fwd+bwd
#   163 us against CUDA's 202 in fp32, 82 against 132 in bf16; the forwards tie).
# - grid_sample, spade_norm, mlp_composite: not yet timed on a GPU; Triton until they are.
_CPU_ORDER = ("cpu", "reference")
AUTO_ORDER = {
    "composite": {"cpu": _CPU_ORDER, "cuda": ("triton", "cuda", "reference")},
    "grid_sample": {"cpu": _CPU_ORDER, "cuda": ("triton", "cuda", "reference")},
    "spade_norm": {"cpu": _CPU_ORDER, "cuda": ("triton", "cuda", "reference")},
    "mlp_composite": {"cpu": _CPU_ORDER, "cuda": ("triton", "cuda", "reference")},
}
DEVICE_TYPES = ("cpu", "cuda")


def _triton_status() -> tuple[bool, bool, str]:
    """(on CUDA tensors, on CPU tensors, why not)."""
    if importlib.util.find_spec("triton") is None:
        return False, False, "triton is not installed (pip install triton)"
    if os.environ.get("FNEVR_TRITON_COMPILE_ONLY", ""):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("FNEVR_TRITON_COMPILE_ONLY and TRITON_INTERPRET=1 exclude each other: set one")
        from ..kernels import aot  # compiles for that GPU, launches nothing: outputs are never written

        arch = aot.requested_arch()
        aot.activate(arch)
        return False, True, f"FNEVR_TRITON_COMPILE_ONLY={arch}: Triton compiles for sm_{arch} and launches nothing"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, True, ""
    if not torch.cuda.is_available():
        return False, False, "no CUDA device, and TRITON_INTERPRET=1 (the interpreter, for CPU tensors) is not set"
    return True, False, "the compiled Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on the CPU)"


_triton_cuda, _triton_cpu, _triton_reason = _triton_status()
_cuda_ok, _cuda_reason = _extension.cuda_status()

# (backend, device type) -> why it cannot run there, or "" if it can.
_UNAVAILABLE = {
    ("reference", "cpu"): "",
    ("reference", "cuda"): "",
    ("cpu", "cpu"): "" if _extension.cpu_available else _extension.cpu_reason,
    ("cpu", "cuda"): "the cpu backend runs on CPU tensors only",
    ("cuda", "cpu"): "the cuda backend runs on CUDA tensors only",
    ("cuda", "cuda"): "" if _cuda_ok else _cuda_reason,
    ("triton", "cpu"): "" if _triton_cpu else _triton_reason,
    ("triton", "cuda"): "" if _triton_cuda else _triton_reason,
}


def backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Report every backend for tensors on `device`: "available", or "unavailable: <why>".

    >>> fnevr.ops.backends("cpu")["reference"]
    'available'
    """
    kind = torch.device(device).type
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device must be a cpu or cuda device, got {device!r}")
    status = {b: "available" if not _UNAVAILABLE[(b, kind)] else f"unavailable: {_UNAVAILABLE[(b, kind)]}"
              for b in BACKENDS}
    if _triton_cpu and not _triton_cuda and kind == "cpu":  # compile-only: runs, but computes nothing
        status["triton"] = f"available, outputs unwritten: {_triton_reason}"
    return status


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that will run `op` for tensors on `device`; raises if a forced one cannot."""
    # Every op call asks: the common answers are looked up (a non-str backend gets _resolve's error).
    name = _RESOLVED.get((backend, device.type, op)) if isinstance(backend, str) else None
    return name if name is not None else _resolve(backend, device.type, op)


def _resolve(backend: str, kind: str, op: str) -> str:
    if backend == "auto":
        for name in AUTO_ORDER[op].get(kind, ("reference",)):
            if not _UNAVAILABLE.get((name, kind), "n/a"):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = _UNAVAILABLE.get((backend, kind), f"tensors on {kind} are not supported")
    if why:
        raise RuntimeError(f"backend={backend!r} cannot run on {kind} tensors: {why}")
    return backend


_RESOLVED = {(b, kind, op): _resolve(b, kind, op) for b in ("auto",) + BACKENDS for kind in DEVICE_TYPES
             for op in OPS if b == "auto" or not _UNAVAILABLE[(b, kind)]}


# --- custom ops with an eager fast path ------------------------------------------------------------

_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types that dispatch no differently from Tensor


def _plain_eager(tensors) -> bool:
    """Whether calling an op's implementation directly is indistinguishable from calling its custom
    op: not traced (torch.compile, export), no torch.func transform, no torch function or dispatch
    mode (FakeTensorMode, profilers of ops), no tensor subclass (FakeTensor, DTensor)."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()):
        return False
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    return True


class FusedOp:
    """A ``torch.library`` custom op (``.op``: what torch.compile, opcheck and any mode or transform
    see) that skips its own layers in plain eager mode: it calls the implementation directly when
    autograd has nothing to record, else an ``autograd.Function`` with the same ``setup_context``
    and ``backward``. Those layers (argument handling, redispatch, a generated autograd Function)
    cost more than a small kernel: measured on a 2-core CPU, about half of a tiny compositing call
    (12 -> 6 us) and a third of its forward+backward. Positional arguments only, tensors (and
    ``list[Tensor]``) first. With a tensor list and autograd to record, the custom op runs: an
    ``autograd.Function`` would not see the tensors inside a list.
    """

    def __init__(self, name: str, fn):
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.register_fake = self.op.register_fake
        self._name, self._impl, self._function = name, fn, None
        kinds = [p.annotation for p in inspect.signature(fn).parameters.values()]
        self._tensors = next((i for i, k in enumerate(kinds) if k not in (Tensor, list[Tensor])), len(kinds))
        self._lists = list[Tensor] in kinds[:self._tensors]

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self._impl

        def forward(ctx, *args):  # ctx first: with a separate setup_context, each apply() would
            out = impl(*args)     # bind its arguments with inspect.signature (~15 us)
            setup_context(ctx, args, out)
            return out

        # The custom op's own autograd Function has this name: grad_fn reads the same either way.
        name = "GeneratedBackwardFor_" + self._name.replace("::", "_") + "_default"
        self._function = type(name, (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        tensors = args[:self._tensors]
        if self._lists:
            tensors = [t for a in tensors for t in (a if isinstance(a, (list, tuple)) else (a,))]
        if not _plain_eager(tensors):
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            # without an autograd formula, the custom op raises its own error in backward
            return self.op(*args) if self._function is None or self._lists else self._function.apply(*args)
        return self._impl(*args)


def custom_op(name: str):
    """``@custom_op("fnevr::name")``: a :class:`FusedOp` (no mutated arguments) for the decorated function."""
    return lambda fn: FusedOp(name, fn)
