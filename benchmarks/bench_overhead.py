"""Op-call overhead: each op on a tiny input, where the arithmetic is negligible, so the time per
call is the cost of getting to the kernel (Python argument checks, torch.library dispatch,
autograd bookkeeping, launch). On a GPU the table's "kernel" column is the device time alone; the
rest of "time" is overhead. Forward only, and forward+backward. ``torch`` is PyTorch's own op
(F.grid_sample, the eager SPADE composition) or, for composite and mlp_composite, the plain
reference functions, without the custom op's layers; ``reference`` is the op with that backend.

On the CPU one call is too short to time alone (the shared timing takes three rounds there), so a
timed round makes CALLS calls and the table reports the median per call.

A CPU proxy for the Triton path's host cost: with ``FNEVR_TRITON_COMPILE_ONLY=90`` the Triton
backend runs its real launch code on CPU tensors (kernels compiled for sm_90, launches that do
nothing; see fnevr.kernels.aot), so its row here is everything a GPU call costs on the host but the
driver's launch itself:

    FNEVR_TRITON_COMPILE_ONLY=90 python benchmarks/run.py overhead
"""

import pytest
import torch
import torch.nn.functional as F

import fnevr
from conftest import ROWS
from fnevr.model.render import SampleMLP
from fnevr.ops import (MLP_PARAMETERS, composite, composite_reference, grid_sample, mlp_composite,
                       mlp_composite_reference, spade_norm)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALLS = 1 if DEVICE == "cuda" else 100  # on CUDA, the shared timing batches calls itself
# On the CPU, Triton runs under the interpreter (not timed: it is for tests) or compile-only (timed:
# the host path of a GPU call).
FUSED = [b for b in ("cpu", "cuda", "triton") if fnevr.ops.backends(DEVICE)[b].startswith("available")
         and not (b == "triton" and DEVICE == "cpu" and fnevr.ops.backends(DEVICE)[b] == "available")]


def _inputs(op, device=DEVICE):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.rand(*shape, generator=g).to(device)

    if op == "composite":
        return t(1, 4, 4, 8, 8), t(1, 4, 4, 8, 1)
    if op == "grid_sample":
        return t(1, 4, 8, 8), t(1, 8, 8, 2) * 2 - 1
    if op == "mlp_composite":  # codes, then the MLP's parameters
        torch.manual_seed(0)
        named = dict(SampleMLP(color_dim=4, shape_dim=4, hidden=16, out_channels=8).named_parameters())
        return (t(1, 4, 4, 8, 4), t(1, 4, 4, 8, 4), *(named[n].detach().to(device) for n in MLP_PARAMETERS))
    return t(1, 4, 8, 8), t(1, 4, 8, 8), t(1, 4, 8, 8)


def _call(op, provider):
    if provider == "torch":  # PyTorch's own ops: the reference functions where PyTorch has no such op
        if op == "grid_sample":
            return lambda x, g: F.grid_sample(x, g, align_corners=False)
        if op == "composite":
            return lambda c, d: composite_reference(c, d, transmittance="inclusive")
        if op == "mlp_composite":
            return lambda cc, sc, *p: mlp_composite_reference(cc, sc, p, transmittance="inclusive")[0]
        return lambda x, gamma, beta: torch.relu(F.instance_norm(x) * (1 + gamma) + beta)
    if op == "mlp_composite":  # the features (the weight sum stays out of the loss)
        return lambda cc, sc, *p: mlp_composite(cc, sc, p, transmittance="inclusive", backend=provider)[0]
    if op == "composite":
        return lambda c, d: composite(c, d, transmittance="inclusive", backend=provider)
    if op == "grid_sample":
        return lambda x, g: grid_sample(x, g, backend=provider)
    return lambda x, gamma, beta: spade_norm(x, gamma, beta, activation="relu", backend=provider)


OPS = ("composite", "grid_sample", "spade_norm", "mlp_composite")
CASES = [(op, p) for op in OPS for p in ["torch", "reference"] + FUSED]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("op, provider", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_overhead(measure, benchmark, op, provider, backward):
    args = [a.requires_grad_(backward) for a in _inputs(op)]
    fn = _call(op, provider)

    def run():
        for _ in range(CALLS):
            if backward:
                fn(*args).sum().backward()
            else:
                with torch.no_grad():
                    fn(*args)

    label = "triton-sm90-null-launch" if provider == "triton" and DEVICE == "cpu" else provider
    measure(run, 0, op=f"{op}-tiny", provider=label, mode="fwd+bwd" if backward else "forward",
            dtype="float32", device=DEVICE)
    if CALLS > 1:  # measure() reported one run: make it one call
        row = ROWS[-1]
        row.update(median_us=row["median_us"] / CALLS, calls_per_round=row["calls_per_round"] * CALLS)
        benchmark.extra_info.update(median_us=row["median_us"], calls_per_round=row["calls_per_round"])
