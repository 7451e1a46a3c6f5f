"""The registry: every backend and every fused op, each described once.

Everything that lists ops or backends reads them from here: ``backend="auto"``,
:func:`fnevr.ops.backends`, the CLI's ``--backend`` choices, the op-contract tests
(tests/test_op_contract.py), the benchmarks (benchmarks/run.py, bench_overhead.py), the device check
(benchmarks/gpu_check.sh, through ``python -m fnevr.ops list``) and ``make bench``.

An op registers itself at the end of its own module (``register(Op(...))``); ``fnevr/ops/__init__.py``
imports the op modules, so that import list is the registry's list of ops. Statuses are read once
at import (Dynamo then sees constants, so resolving a backend inside ``torch.compile`` costs no
graph break). Set TRITON_INTERPRET before importing fnevr to use the interpreter.
"""

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import _extension

DEVICE_TYPES = ("cpu", "cuda")


# --- backends ------------------------------------------------------------------------------------


class _CompiledKernels:
    """An op's entry points in the compiled extension: ``k.composite_forward`` is
    ``torch.ops.fnevr._composite_forward`` (torch dispatches on the tensors' device, so the cpu and
    cuda backends share this). Entry points are named as in the Triton modules, with a leading ``_``
    in the C++ schemas (``TORCH_LIBRARY_FRAGMENT`` in csrc/<op>/<op>_cpu.cpp): they are not for users."""

    def __getattr__(self, name: str):  # called once per name: the op is then an attribute
        op = getattr(torch.ops.fnevr, "_" + name)
        setattr(self, name, op)
        return op


def _compiled(op: str) -> Any:
    return _CompiledKernels()


def _triton(op: str) -> ModuleType:
    return importlib.import_module(f"fnevr.kernels.{op}")  # imports triton: only when asked for


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


@dataclass(frozen=True)
class Backend:
    """One implementation family of every op.

    ``devices``: the device types whose tensors it takes, each mapped to why it cannot run on them
    here ("" if it can); ``kernels(op)`` returns the namespace of that op's kernel entry points
    (None for the reference, which is each op's own Python function); ``sources``: where an op's
    kernels live.
    """

    name: str
    summary: str
    sources: str
    devices: dict[str, str]
    kernels: Callable[[str], Any] | None = None

    def unavailable(self, device_type: str) -> str:
        """Why this backend cannot run on tensors of `device_type` here, or "" if it can."""
        if device_type not in self.devices:
            return f"the {self.name} backend runs on {' or '.join(self.devices)} tensors only"
        return self.devices[device_type]


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "reference",
            "pure PyTorch, differentiated by autograd: the spec",
            "fnevr/ops/<op>.py",
            {"cpu": "", "cuda": ""},
        ),
        Backend(
            "cpu",
            "C++ kernels (fnevr._C)",
            "csrc/<op>/<op>_cpu.cpp",
            {"cpu": "" if _extension.cpu else _extension.cpu_reason},
            _compiled,
        ),
        Backend(
            "cuda",
            "CUDA C++ kernels (fnevr._C_cuda)",
            "csrc/<op>/<op>_cuda.cu",
            {"cuda": "" if _cuda_ok else _cuda_reason},
            _compiled,
        ),
        Backend(
            "triton",
            "Triton kernels (fnevr.kernels); CPU tensors through TRITON_INTERPRET=1",
            "kernels/<op>.py",
            {"cpu": "" if _triton_cpu else _triton_reason, "cuda": "" if _triton_cuda else _triton_reason},
            _triton,
        ),
    )
}
FUSED_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.kernels is not None)


def backends(device: str | torch.device = "cpu", op: str | None = None) -> dict[str, str]:
    """Report every backend for tensors on `device`: "available", or "unavailable: <why>". With
    `op`, also what ``backend="auto"`` runs for it there (key "auto"), including any shapes on
    which it runs PyTorch's own op because that is the faster.

    >>> fnevr.ops.backends("cpu")["reference"]
    'available'
    """
    kind = torch.device(device).type
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device must be a cpu or cuda device, got {device!r}")
    status = {
        name: f"unavailable: {why}" if (why := b.unavailable(kind)) else "available" for name, b in BACKENDS.items()
    }
    if _triton_cpu and not _triton_cuda and kind == "cpu":  # compile-only: runs, but computes nothing
        status["triton"] = f"available, outputs unwritten: {_triton_reason}"
    if op is not None:
        if op not in _OPS:
            raise ValueError(f"op must be one of {tuple(_OPS)}, got {op!r}")
        name = resolve("auto", torch.device(kind), op)
        rule = _OPS[op].pytorch_when.get(kind) if name in FUSED_BACKENDS else None
        status["auto"] = name + (f"; PyTorch's op {rule[1]}" if rule else "")
    return status


# --- ops -----------------------------------------------------------------------------------------

# Fused backends accumulate in fp32 (fp64 for fp64), so the error is about one rounding of the output dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Sample:
    """One call of an op, for the tests and benchmarks: ``op.fn(*args, **kwargs, backend=...)``.
    ``wrt``: positions of the tensor arguments that get gradients; ``max_saved``: how many elements
    the fused backends may save for backward (the inputs and small statistics, no temporaries)."""

    label: str
    args: tuple
    kwargs: dict
    wrt: tuple[int, ...]
    max_saved: int


@dataclass(frozen=True)
class Op:
    """A fused op.

    - ``fn(*tensors, **options, backend=...)``: the public function; ``reference``: the spec, with
      the same tensors and options but ``backend`` and those that only steer a kernel (grid_sample's
      ``deterministic``); ``fn(..., backend="reference")`` calls it; ``pytorch``: PyTorch's own op
      where one exists (the benchmarks' baseline), else the reference.
    - ``auto``: per device type, the fused backends ``auto`` tries, fastest first (the reference
      comes last); ``why_auto`` says what measured that order.
    - ``samples(device, dtype, generator)``: small calls that take every path of forward and
      backward (the op-contract tests run each; the first is the benchmarks' tiny input).
    - ``tolerance``: per dtype, the largest error against the fp64 reference, relative to its
      largest magnitude.
    - ``layouts``: whether the op keeps channels_last inputs' memory format.
    - ``pytorch_when``: per device type, (test, when): where ``auto``'s first fused backend is
      slower than PyTorch's own op, ``test(*args, **kwargs)`` says whether a call is such a one, and
      ``auto`` then runs PyTorch's op; ``when`` says it in words (for :func:`backends`).
    """

    name: str
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    samples: Callable[[str | torch.device, torch.dtype, torch.Generator], list[Sample]]
    auto: dict[str, tuple[str, ...]]
    why_auto: str
    tolerance: dict[torch.dtype, float] = field(default_factory=lambda: dict(TOLERANCE))
    layouts: bool = False
    pytorch: Callable[..., Any] | None = None
    pytorch_when: dict[str, tuple[Callable[..., bool], str]] = field(default_factory=dict)


# The C++ kernels are the fastest on CPU tensors wherever they are built (the 2026-11-24 CPU results).
CPU_ORDER = ("cpu",)

_OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add `op` (called once, at the end of its module)."""
    if op.name in _OPS:
        raise RuntimeError(f"fnevr op {op.name!r} is registered twice")
    unknown = {b for order in op.auto.values() for b in order} - set(FUSED_BACKENDS)
    if unknown or set(op.auto) - set(DEVICE_TYPES):
        raise ValueError(f"{op.name}: auto order names unknown backends or devices: {op.auto}")
    _OPS[op.name] = op
    for kind in DEVICE_TYPES:
        for name in ("auto",) + tuple(BACKENDS):
            if name == "auto" or not BACKENDS[name].unavailable(kind):
                _RESOLVED[(name, kind, op.name)] = _resolve(name, kind, op.name)
    return op


def ops() -> dict[str, Op]:
    """Every registered op, by name, in registration order."""
    return dict(_OPS)


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    return _OPS[op].auto.get(device_type, ()) + ("reference",)


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that will run `op` for tensors on `device`; raises if a forced one cannot."""
    # Every op call asks: the common answers are looked up (a non-str backend gets _resolve's error).
    name = _RESOLVED.get((backend, device.type, op)) if isinstance(backend, str) else None
    return name if name is not None else _resolve(backend, device.type, op)


def _resolve(backend: str, kind: str, op: str) -> str:
    if backend == "auto":
        for name in auto_order(op, kind):
            if kind in DEVICE_TYPES and not BACKENDS[name].unavailable(kind):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {backend!r}")
    why = BACKENDS[backend].unavailable(kind) if kind in DEVICE_TYPES else f"tensors on {kind} are not supported"
    if why:
        raise RuntimeError(f"backend={backend!r} cannot run on {kind} tensors: {why}")
    return backend


_RESOLVED: dict[tuple[str, str, str], str] = {}


_KERNELS: dict[tuple[str, str], Any] = {}


def kernels(backend: str, op: str) -> Any:
    """The namespace of `op`'s kernel entry points in fused `backend` (looked up on every call: cached)."""
    found = _KERNELS.get((backend, op))
    if found is None:
        load = BACKENDS[backend].kernels
        if load is None:
            raise ValueError(f"the {backend} backend has no kernels: it runs {op}'s Python reference")
        found = _KERNELS[(backend, op)] = load(op)
    return found


def tensors(shapes: Sequence[tuple[int, ...]], device, dtype, generator: torch.Generator) -> list[Tensor]:
    """Uniform [0, 1) tensors of `shapes` drawn in fp64 from `generator` (so every dtype and device
    gets the same values), for the ops' samples."""
    return [torch.rand(s, generator=generator, dtype=torch.float64).to(device, dtype) for s in shapes]
