"""Shared by the op tests: which backends run here, and per-dtype tolerances."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fnevr
from fnevr.ops import _registry

# Largest error allowed, relative to the largest magnitude of the fp64 reference (the registry's
# default; an op with its own table says so in its registry entry).
TOL = _registry.TOLERANCE

# Every fused (backend, device) pair; unavailable ones are skipped with the reason backends() gives.
FUSED = [(name, kind) for name, b in _registry.BACKENDS.items() if b.kernels is not None for kind in b.devices]


def target_params(pairs=FUSED):
    params = []
    for backend, device in pairs:
        if device == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device"
        else:
            status = fnevr.ops.backends(device)[backend]
            why = "" if status == "available" else status
        params.append(
            pytest.param(backend, device, id=f"{backend}-{device}", marks=pytest.mark.skipif(bool(why), reason=why))
        )
    return params


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", tol: dict | None = None
):
    """`actual` (any dtype) against an fp64 `expected`: same shape, finite where it is, and
    max |actual - expected| <= tol[dtype] * max |expected| (tol defaults to TOL)."""
    tol = tol or TOL
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{what}: non-finite values differ"
    finite = expected.isfinite()
    actual, expected = actual[finite], expected[finite]
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol[dtype], f"{what}: max error {err:.3g} x max|ref| exceeds {tol[dtype]:.1g} for {dtype}"


def compile_params():
    """target_params() x the torch.compile backends (aot_eager, inductor): (backend, device, compiler)."""
    # Inductor compiles are slow cold: left out of the device check's --quick run.
    return [
        pytest.param(
            *p.values[:2],
            compiler,
            id=f"{p.id}-{compiler}",
            marks=list(p.marks) + ([pytest.mark.gpu_heavy] if compiler == "inductor" else []),
        )
        for p in target_params()
        for compiler in ("aot_eager", "inductor")
        if not (compiler == "inductor" and p.id == "triton-cpu")
    ]  # inductor cannot target the interpreter


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python (without TRITON_INTERPRET unless given): for what must be seen at
    import time, and for what could crash the process."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
