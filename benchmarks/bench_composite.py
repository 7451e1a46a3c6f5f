"""Compositing at FNeVR's shape [4, 64, 64, 8, 256]: every backend and torch.compile of the
reference, forward and forward+backward, against a device copy of the same bytes.

Effective bandwidth counts the bytes that must move: forward reads colour and density and writes
the output; backward reads grad_out, colour and density and writes both gradients.
"""

import pytest
import torch

import fnevr
from conftest import gpu_copy, measure_copy, modes, saved_MB
from fnevr.ops import composite, composite_reference

SHAPE = (4, 64, 64, 8, 256)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
PROVIDERS = ["reference", "compiled-reference"] + [
    b
    for b in ("cpu", "cuda", "triton")
    if fnevr.ops.backends(DEVICE)[b] == "available"
    and not (b == "triton" and DEVICE == "cpu")  # the interpreter is for tests, not timing
]


def _op(provider):
    if provider == "compiled-reference":
        return torch.compile(lambda c, d: composite_reference(c, d, transmittance="inclusive"))
    return lambda c, d: composite(c, d, transmittance="inclusive", backend=provider)


def _inputs(dtype, grad, shape=SHAPE, device=DEVICE):
    torch.manual_seed(0)
    color = torch.rand(shape, device=device, dtype=dtype, requires_grad=grad)
    density = torch.randn(shape[:-1] + (1,), device=device, dtype=dtype, requires_grad=grad)
    return color, density


def _bytes(color, density, backward):
    size = lambda t: t.numel() * t.element_size()
    out = size(color) // color.shape[-2]
    fwd = size(color) + size(density) + out
    return fwd + (out + 2 * size(color) + 2 * size(density) if backward else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_bandwidth(measure, dtype):
    measure_copy(measure, SHAPE, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
def test_composite(measure, provider, dtype, backward):
    color, density = _inputs(dtype, backward)
    op = _op(provider)
    grad_out = torch.rand(SHAPE[:-2] + SHAPE[-1:], device=DEVICE, dtype=dtype)

    def forward():
        with torch.no_grad():
            return op(color, density)

    def forward_backward():
        color.grad = density.grad = None
        op(color, density).backward(grad_out)

    measure(
        forward_backward if backward else forward,
        _bytes(color, density, backward),
        op="composite",
        provider=provider,
        mode="fwd+bwd" if backward else "forward",
        dtype=str(dtype)[6:],
        device=DEVICE,
        **({"saved_MB": saved_MB(lambda: op(color, density))} if backward else {}),
    )


def gpu(s, dtype):
    """benchmarks/gpu_bench.py's rows for this op (`s`: its Settings): FNeVR's shapes, each fused backend
    against PyTorch and torch.compile, forward and backward."""
    shape = (1, 4, 4, 8, 16) if s.dry else SHAPE
    case = "x".join(map(str, shape))
    gpu_copy(s, "composite", shape, dtype)
    kw = dict(transmittance="inclusive")
    providers = {"reference": lambda c, d: composite_reference(c, d, **kw)}
    if s.compiler:
        providers["compiled-reference"] = s.compile(providers["reference"])
    for b in s.fused:
        providers[b] = (lambda backend: lambda c, d: composite(c, d, backend=backend, **kw))(s.backend(b))
    color, density = _inputs(dtype, True, shape, s.device)
    grad_out = torch.rand(shape[:-2] + shape[-1:], device=s.device, dtype=dtype)
    fwd, both = _bytes(color, density, False), _bytes(color, density, True)
    for provider, op in providers.items():
        which = ("fwd+bwd",) if provider.startswith("compiled") else ("forward", "backward", "fwd+bwd")
        for mode, fn in modes(op, (color, density), grad_out, which).items():
            s.run(
                fn,
                bench="composite",
                case=case,
                provider=provider,
                mode=mode,
                dtype=str(dtype)[6:],
                bytes={"forward": fwd, "backward": both - fwd, "fwd+bwd": both}[mode],
                copy_of="composite",
                profile=provider in s.fused and mode == "fwd+bwd",
            )
