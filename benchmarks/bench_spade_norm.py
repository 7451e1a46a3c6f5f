"""SPADE normalisation at FNeVR's decoder shapes ([B, 512, 64, 64], [B, 128, 128, 128],
[B, 32, 256, 256]; B = 4 on a GPU, 1 on the CPU), NCHW and channels_last (training on CUDA uses
channels_last; its rows are named spade-C<C>-cl): the fused backends against the eager composition
(InstanceNorm2d -> * (1 + gamma) + beta -> ReLU) and, on a GPU, its torch.compile; forward and
forward+backward.

Effective bandwidth counts the bytes that must move: forward reads x, gamma, beta and writes y;
backward also reads grad_y, x, gamma, beta and writes the three gradients.
"""

import pytest
import torch

import fnevr
from conftest import measure_copy, modes, saved_MB
from fnevr.ops import spade_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 4 if DEVICE == "cuda" else 1


def shapes(B, size=256):
    """The decoder's SPADE inputs for frames of side `size`."""
    return [(B, 512, size // 4, size // 4), (B, 128, size // 2, size // 2), (B, 32, size, size)]


SHAPES = shapes(B)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
# Inductor's CPU code generation takes minutes on a small machine: compiled runs are for GPUs.
PROVIDERS = (
    ["eager"]
    + (["compiled-eager"] if DEVICE == "cuda" else [])
    + [
        b
        for b in ("cpu", "cuda", "triton")
        if fnevr.ops.backends(DEVICE)[b] == "available"
        and not (b == "triton" and DEVICE == "cpu")  # the interpreter is for tests, not timing
    ]
)


def eager(x, gamma, beta):
    return torch.relu(torch.nn.functional.instance_norm(x) * (1 + gamma) + beta)


def _op(provider):
    if provider == "eager":
        return eager
    if provider == "compiled-eager":
        return torch.compile(eager)
    return lambda x, g, b: spade_norm(x, g, b, activation="relu", backend=provider)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_bandwidth(measure, dtype):
    measure_copy(measure, SHAPES[0], dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_spade_norm(measure, layout, shape, provider, dtype, backward):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x, gamma, beta, grad_y = (
        torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) for _ in range(4)
    )
    for t in (x, gamma, beta):
        t.requires_grad_(backward)
    op = _op(provider)

    def forward():
        with torch.no_grad():
            return op(x, gamma, beta)

    def forward_backward():
        x.grad = gamma.grad = beta.grad = None
        op(x, gamma, beta).backward(grad_y)

    tensor_bytes = x.numel() * x.element_size()
    measure(
        forward_backward if backward else forward,
        tensor_bytes * (11 if backward else 4),
        op=f"spade-C{shape[1]}" + ("-cl" if layout == "cl" else ""),
        provider=provider,
        layout=layout,
        mode="fwd+bwd" if backward else "forward",
        dtype=str(dtype)[6:],
        device=DEVICE,
        **({"saved_MB": saved_MB(lambda: op(x, gamma, beta))} if backward else {}),
    )


def gpu(s, dtype):
    """benchmarks/gpu_bench.py's rows for this op (`s`: its Settings): FNeVR's shapes, each fused backend
    against PyTorch and torch.compile, forward and backward."""
    for i, shape in enumerate(shapes(1, size=16) if s.dry else SHAPES):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            x, gamma, beta, grad_y = (
                torch.randn(shape, device=s.device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(4)
            )
            inputs = tuple(t.requires_grad_() for t in (x, gamma, beta))
            providers = {"eager": eager}
            if s.compiler and i == 1:  # one shape: Inductor compiles are slow
                providers["compiled-eager"] = s.compile(eager)
            for b in s.fused:
                providers[b] = _op(s.backend(b))
            for provider, op in providers.items():
                which = ("fwd+bwd",) if provider.startswith("compiled") else ("forward", "fwd+bwd")
                for mode, fn in modes(op, inputs, grad_y, which).items():
                    nbytes = x.numel() * x.element_size() * (11 if mode == "fwd+bwd" else 4)
                    s.run(
                        fn,
                        bench="spade_norm",
                        case=f"{'x'.join(map(str, shape))}-{layout}",
                        provider=provider,
                        mode=mode,
                        dtype=str(dtype)[6:],
                        bytes=nbytes,
                        layout=layout,
                        profile=provider in s.fused and mode == "fwd+bwd" and i == 1,
                    )
