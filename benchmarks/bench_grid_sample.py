"""Grid sampling at FNeVR's four shapes: every backend against PyTorch's own op (eager and
torch.compile'd) and the reference, forward and forward+backward (gradients for input and grid);
on CUDA also the fused backends' deterministic backward.

Cases (B = 4 on CUDA, 2 on the CPU):
    feature      [B, 256, 64, 64] channels_last by a [B, 64, 64, 2] flow (the hot case), zeros
    feature-nchw the same in NCHW
    motion       [B*11, 3, 64, 64] source copies in the dense motion network, zeros
    visual       [B, 3, 256, 256] source at full size, zeros
    equivariance [B, 3, 256, 256] full frames, reflection padding

Effective bandwidth counts the bytes that must move: forward reads input and grid and writes the
output; backward reads grad_out, input and grid and writes both gradients.
"""

import pytest
import torch
import torch.nn.functional as F

import fnevr
from conftest import measure_copy, modes
from fnevr.ops import grid_sample, grid_sample_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 4 if DEVICE == "cuda" else 2


def cases(B, size=64):
    """name: (input shape, output size, padding, channels_last); `size` is the feature maps' side
    (64 in FNeVR at 256x256, whose frames are 4x larger)."""
    full = 4 * size
    return {
        "feature": ((B, 256, size, size), (size, size), "zeros", True),
        "feature-nchw": ((B, 256, size, size), (size, size), "zeros", False),
        "motion": ((B * 11, 3, size, size), (size, size), "zeros", False),
        "visual": ((B, 3, full, full), (full, full), "zeros", False),
        "equivariance": ((B, 3, full, full), (full, full), "reflection", False),
    }


CASES = cases(B)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
FUSED = [
    b
    for b in ("cpu", "cuda", "triton")
    if fnevr.ops.backends(DEVICE)[b] == "available" and not (b == "triton" and DEVICE == "cpu")
]  # the interpreter is for tests, not timing
PROVIDERS = (
    ["torch", "torch-compiled", "reference"]
    + FUSED
    + ([f"{b}-deterministic" for b in FUSED] if DEVICE == "cuda" else [])
)


def _op(provider, padding):
    if provider == "torch":
        return lambda x, g: F.grid_sample(x, g, padding_mode=padding, align_corners=False)
    if provider == "torch-compiled":
        return torch.compile(lambda x, g: F.grid_sample(x, g, padding_mode=padding, align_corners=False))
    if provider == "reference":
        return lambda x, g: grid_sample_reference(x, g, "bilinear", padding, False)
    backend, _, det = provider.partition("-")
    return lambda x, g: grid_sample(x, g, "bilinear", padding, False, backend=backend, deterministic=bool(det))


def _inputs(case, dtype, grad, spec=None, device=DEVICE):
    shape, (Ho, Wo), padding, channels_last = spec or CASES[case]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(shape, device=device, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # A smooth warp, as a motion field is: identity plus a small displacement, partly off the image.
    base = F.affine_grid(
        torch.eye(2, 3, device=device).expand(shape[0], 2, 3), (shape[0], 1, Ho, Wo), align_corners=False
    )
    grid = (base * 1.05 + 0.1 * torch.rand(shape[0], Ho, Wo, 2, device=device, generator=gen) - 0.05).to(dtype)
    return x.requires_grad_(grad), grid.requires_grad_(grad), padding


def _bytes(x, grid, out_numel, backward):
    size = lambda t: t.numel() * t.element_size()
    out = out_numel * x.element_size()
    fwd = size(x) + size(grid) + out
    return fwd + (out + size(x) + size(grid) + size(x) + size(grid) if backward else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_bandwidth(measure, dtype):
    measure_copy(measure, CASES["feature"][0], dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_grid_sample(measure, case, provider, dtype, backward):
    if provider.endswith("-deterministic") and not backward:
        pytest.skip("determinism concerns the backward only")
    x, grid, padding = _inputs(case, dtype, backward)
    op = _op(provider, padding)
    out_numel = x.shape[0] * x.shape[1] * grid.shape[1] * grid.shape[2]
    grad_out = torch.rand(x.shape[0], x.shape[1], *grid.shape[1:3], device=DEVICE, dtype=dtype)

    def forward():
        with torch.no_grad():
            return op(x, grid)

    def forward_backward():
        x.grad = grid.grad = None
        op(x, grid).backward(grad_out)

    measure(
        forward_backward if backward else forward,
        _bytes(x, grid, out_numel, backward),
        op=f"gs/{case}",
        provider=provider,
        mode="fwd+bwd" if backward else "forward",
        dtype=str(dtype)[6:],
        device=DEVICE,
    )


def gpu(s, dtype):
    """benchmarks/gpu_bench.py's rows for this op (`s`: its Settings): FNeVR's shapes, each fused backend
    against PyTorch and torch.compile, forward and backward."""
    for case, spec in (cases(1, size=8) if s.dry else CASES).items():
        x, grid, padding = _inputs(case, dtype, True, spec, s.device)
        out_numel = x.shape[0] * x.shape[1] * grid.shape[1] * grid.shape[2]
        grad_out = torch.rand(x.shape[0], x.shape[1], *grid.shape[1:3], device=s.device, dtype=dtype)
        which = ("forward", "backward", "fwd+bwd") if case.startswith("feature") else ("forward", "fwd+bwd")
        for provider in ("torch", *s.fused):
            op = _op(s.backend(provider) if provider in s.fused else provider, padding)
            for mode, fn in modes(op, (x, grid), grad_out, which).items():
                full = _bytes(x, grid, out_numel, True)
                fwd = _bytes(x, grid, out_numel, False)
                s.run(
                    fn,
                    bench="grid_sample",
                    case=case,
                    provider=provider,
                    mode=mode,
                    dtype=str(dtype)[6:],
                    bytes={"forward": fwd, "backward": full - fwd, "fwd+bwd": full}[mode],
                    profile=provider in s.fused and mode == "fwd+bwd" and case == "feature",
                )
