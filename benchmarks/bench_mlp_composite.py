"""The ray head at FNeVR's vox-256 shape: per-sample MLP (codes 16 + 16 -> 128 hidden -> 256
colour channels) on [B, 64, 64, 8] samples, compositing, sigmoid-free colour per ray. Forward and
forward+backward (gradients for the codes and every MLP parameter).

Providers:
- ``unfused``: the published path, SampleMLP's full colour field ``[B, 64, 64, 8, 256]`` then
  compositing (both plain PyTorch, the reference backend);
- ``compiled-unfused``: the same under torch.compile (GPU only: Inductor's CPU build takes minutes);
- ``head-<backend>``: ``fused_head: hidden``, the hidden features composited by ``fnevr.ops.composite``,
  the last layer per ray;
- ``mlp-<backend>``: ``fused_head: mlp``, ``fnevr.ops.mlp_composite`` (nothing per sample is stored).
``saved_MB`` is what the forward keeps for backward. The op is compute bound, so the GB/s column
(minimum bytes: codes in, colours out) says little; compare times.
"""

import pytest
import torch
import torch.nn.functional as F

import fnevr
from conftest import modes, saved_MB
from fnevr.model.render import SampleMLP
from fnevr.ops import composite, mlp_composite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 4 if DEVICE == "cuda" else 1
SHAPE = (BATCH, 64, 64, 8)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
FUSED = [
    b
    for b in ("cpu", "cuda", "triton")
    if fnevr.ops.backends(DEVICE)[b] == "available" and not (b == "triton" and DEVICE == "cpu")
]  # the interpreter is for tests, not timing
PROVIDERS = (
    ["unfused"]
    + (["compiled-unfused"] if DEVICE == "cuda" else [])
    + [f"{kind}-{b}" for kind in ("head", "mlp") for b in FUSED]
)
KW = dict(transmittance="inclusive", density_activation="relu")


def _head(provider, mlp):
    last = mlp.color_out
    if provider in ("unfused", "compiled-unfused"):

        def unfused(cc, sc):
            color, density = mlp(cc, sc)
            return composite(color, density, backend="reference", **KW)

        return torch.compile(unfused) if provider == "compiled-unfused" else unfused
    kind, backend = provider.split("-")
    if kind == "head":

        def head(cc, sc):
            hidden, density = mlp.hidden_features(cc, sc)
            weight_sum = composite(torch.ones_like(density), density, backend=backend, **KW)
            return F.linear(composite(hidden, density, backend=backend, **KW), last.weight) + weight_sum * last.bias

        return head
    params = dict(mlp.named_parameters())

    def fused(cc, sc):
        features, weight_sum = mlp_composite(cc, sc, params, backend=backend, **KW)
        return F.linear(features, last.weight) + weight_sum * last.bias

    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
def test_ray_head(measure, provider, dtype, backward):
    torch.manual_seed(0)
    mlp = SampleMLP(color_dim=16, shape_dim=16, hidden=128, out_channels=256).to(DEVICE)
    cc, sc = (torch.rand(*SHAPE, 16, device=DEVICE).requires_grad_(backward) for _ in range(2))
    amp = torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32)
    fn = _head(provider, mlp)
    grad_out = torch.rand(*SHAPE[:-1], 256, device=DEVICE, dtype=dtype)

    def forward():
        with torch.no_grad(), amp:
            return fn(cc, sc)

    def forward_backward():
        mlp.zero_grad(set_to_none=True)
        cc.grad = sc.grad = None
        with amp:
            out = fn(cc, sc)
        out.backward(grad_out.to(out.dtype))

    if backward:
        with amp:
            saved = saved_MB(lambda: fn(cc, sc))
    moved = 2 * cc.numel() * cc.element_size() + grad_out.numel() * grad_out.element_size()
    measure(
        forward_backward if backward else forward,
        moved * (2 if backward else 1),
        op="ray_head",
        provider=provider,
        mode="fwd+bwd" if backward else "forward",
        dtype=str(dtype)[6:],
        device=DEVICE,
        **({"saved_MB": saved} if backward else {}),
    )


def gpu(s, dtype):
    """benchmarks/gpu_bench.py's rows for this op (`s`: its Settings): the vox-256 ray head as the
    test above times it, fp32 parameters, bf16 by autocast."""
    shape = (1, 4, 4, 8) if s.dry else SHAPE
    torch.manual_seed(0)
    mlp = SampleMLP(color_dim=16, shape_dim=16, hidden=128, out_channels=256).to(s.device)
    cc, sc = (torch.rand(*shape, 16, device=s.device).requires_grad_() for _ in range(2))
    amp = torch.autocast(s.device, dtype=dtype, enabled=dtype != torch.float32)
    grad_out = torch.rand(*shape[:-1], 256, device=s.device, dtype=dtype)  # the head's output dtype under amp
    providers = {"unfused": _head("unfused", mlp)}
    if s.compiler:
        providers["compiled-unfused"] = s.compile(providers["unfused"])
    for kind in ("head", "mlp"):
        for b in s.fused:
            providers[f"{kind}-{b}"] = _head(f"{kind}-{s.backend(b)}", mlp)
    inputs = (cc, sc, *mlp.parameters())
    for provider, head in providers.items():

        def op(cc_, sc_, *_params, head=head):
            with amp:
                return head(cc_, sc_)

        with amp:
            saved = saved_MB(lambda: head(cc, sc))
        which = ("fwd+bwd",) if provider.startswith("compiled") else ("forward", "fwd+bwd")
        for mode, fn in modes(op, inputs, grad_out, which).items():
            s.run(
                fn,
                bench="mlp_composite",
                case="x".join(map(str, shape)) + "-H128",
                provider=provider,
                mode=mode,
                dtype=str(dtype)[6:],
                saved_MB=saved,
                profile=provider.startswith("mlp-") and mode == "fwd+bwd",
            )
