"""Op-call overhead: each op on a tiny input, where the arithmetic is negligible, so the time per
call is the cost of getting to the kernel (Python argument checks, torch.library dispatch,
autograd bookkeeping, launch). On a GPU the table's "kernel" column is the device time alone; the
rest of "time" is overhead. Forward only, and forward+backward. ``torch`` is PyTorch's own op
(the registry's ``pytorch``: F.grid_sample) or else the plain reference function (for spade_norm,
the eager composition of PyTorch's norms), without the custom op's layers; ``reference`` is the op
with that backend. Inputs: each op's first sample in the registry (a few hundred elements).

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

import fnevr
from conftest import ROWS
from fnevr.ops import _registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALLS = 1 if DEVICE == "cuda" else 100  # on CUDA, the shared timing batches calls itself
# On the CPU, Triton runs under the interpreter (not timed: it is for tests) or compile-only (timed:
# the host path of a GPU call).
FUSED = [
    b
    for b in _registry.FUSED_BACKENDS
    if fnevr.ops.backends(DEVICE)[b].startswith("available")
    and not (b == "triton" and DEVICE == "cpu" and fnevr.ops.backends(DEVICE)[b] == "available")
]
OPS = _registry.ops()


def _call(op, provider):
    """(function of the sample's tensors, those tensors): each op's first registry sample, in fp32."""
    sample = OPS[op].samples(DEVICE, torch.float32, torch.Generator().manual_seed(0))[0]
    flat = [t for a in sample.args for t in (a if isinstance(a, list) else [a])]
    lists = [len(a) if isinstance(a, list) else None for a in sample.args]

    def regroup(tensors):
        args, k = [], 0
        for n in lists:
            args.append(tensors[k] if n is None else list(tensors[k : k + n]))
            k += 1 if n is None else n
        return args

    if provider == "torch":  # PyTorch's own op, or the plain reference where PyTorch has none
        fn, kwargs = OPS[op].pytorch or OPS[op].reference, sample.kwargs
    else:
        fn, kwargs = OPS[op].fn, dict(sample.kwargs, backend=provider)

    def call(*tensors):
        out = fn(*regroup(tensors), **kwargs)
        return out[0] if isinstance(out, tuple) else out  # mlp_composite: the features

    return call, flat


CASES = [(op, p) for op in OPS for p in ["torch", "reference"] + FUSED]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("op, provider", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_overhead(measure, benchmark, op, provider, backward):
    fn, args = _call(op, provider)
    args = [a.requires_grad_(backward) for a in args]

    def run():
        for _ in range(CALLS):
            if backward:
                fn(*args).sum().backward()
            else:
                with torch.no_grad():
                    fn(*args)

    label = "triton-sm90-null-launch" if provider == "triton" and DEVICE == "cpu" else provider
    measure(
        run,
        0,
        op=f"{op}-tiny",
        provider=label,
        mode="fwd+bwd" if backward else "forward",
        dtype="float32",
        device=DEVICE,
    )
    if CALLS > 1:  # measure() reported one run: make it one call
        row = ROWS[-1]
        row.update(median_us=row["median_us"] / CALLS, calls_per_round=row["calls_per_round"] * CALLS)
        benchmark.extra_info.update(median_us=row["median_us"], calls_per_round=row["calls_per_round"])
