"""fnevr.ops.mlp_composite: the reference against FNeVR's SampleMLP + compositing, every fused
backend against the reference (outputs and all 16 gradients), memory (only inputs saved),
torch.library integration, autocast, bad input."""

import pytest
import torch

import fnevr
from fnevr.model.render import SampleMLP
from fnevr.ops import MLP_PARAMETERS as PARAMETERS
from fnevr.ops import composite_reference, mlp_composite, mlp_composite_reference
from helpers import TOL, assert_close, target_params

MODES = [("exclusive", "relu"), ("inclusive", "relu"), ("exclusive", "softplus"), ("inclusive", "none")]
# (leading ray dims, D, Ec, Es, H, H4): odd widths, D=1, FNeVR's per-sample widths (16/16/128/32) on few rays.
# FNeVR's H = 128: its Triton backward takes a minute or more to compile cold, so not in gpu_check --quick.
SHAPES = [
    ((5,), 3, 3, 5, 8, 2),
    ((2, 3), 8, 16, 16, 32, 8),
    ((4,), 1, 4, 4, 16, 4),
    pytest.param(((3,), 8, 16, 16, 128, 32), marks=pytest.mark.gpu_heavy(backend="triton")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Seven layers and a compositing sum round more than one op: fp16/bf16 get twice helpers.TOL. fp32
# keeps TOL's 2e-5 on CUDA too, where Triton's fp32 dots are tf32x3: an emulation of them (TF32 parts
# rounded as cvt.rna, tensor-core truncation of the low part, lo*lo dropped, fp32 sums per k-step of
# 8) through this op's forward and backward gave at most 2.4e-6 at these shapes (plain fp32: 2.7e-6).
OP_TOL = {**TOL, torch.float16: 2 * TOL[torch.float16], torch.bfloat16: 2 * TOL[torch.bfloat16]}


def make_inputs(lead, D, Ec, Es, H, H4, dtype=torch.float32, device="cpu", seed=0):
    """Codes and a SampleMLP's parameters (list in PARAMETERS order), scaled so that the ReLUs cut
    about half the units and densities spread around zero."""
    g = torch.Generator().manual_seed(seed)
    cc = torch.rand(*lead, D, Ec, generator=g, dtype=torch.float64) * 2 - 1
    sc = torch.rand(*lead, D, Es, generator=g, dtype=torch.float64) * 2 - 1
    params = []
    for name in PARAMETERS:
        layer = name.split(".")[0]
        fan_in = {"shape_in": Es, "color_in": Ec, "fuse": H + H4}.get(layer, H)
        out = {"density": 1, "shape_feature": H4}.get(layer, H)
        shape = (out, fan_in) if name.endswith("weight") else (out,)
        params.append(torch.randn(*shape, generator=g, dtype=torch.float64) * (1.5 / fan_in**0.5))
    return cc.to(device, dtype), sc.to(device, dtype), [p.to(device, dtype) for p in params]


def run(fn, cc, sc, params, grads, **kw):
    """(features, weight_sum, grad color_code, grad shape_code, *param grads)."""
    inputs = [t.detach().requires_grad_() for t in (cc, sc, *params)]
    features, weight_sum = fn(inputs[0], inputs[1], inputs[2:], **kw)
    torch.autograd.backward((features, weight_sum), grads)
    return [features, weight_sum] + [t.grad for t in inputs]


def check_against_reference(cc, sc, params, dtype, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    lead, H = cc.shape[:-2], params[0].shape[0]
    grads = [
        torch.randn(*lead, H, generator=g, dtype=torch.float64),
        torch.randn(*lead, 1, generator=g, dtype=torch.float64),
    ]
    got = run(mlp_composite, cc, sc, params, [t.to(cc.device, dtype) for t in grads], **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    want = run(mlp_composite_reference, *(t.double() for t in (cc, sc)), [p.double() for p in params], grads, **ref_kw)
    names = ["features", "weight_sum", "grad color_code", "grad shape_code"] + [f"grad {n}" for n in PARAMETERS]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert a.device == cc.device, f"{name}: device {a.device}"
        assert_close(a, b, dtype, name, OP_TOL)


@pytest.mark.parametrize("transmittance,activation", MODES)
def test_reference_is_sample_mlp_then_composite(transmittance, activation):
    """The op's spec equals FNeVR's SampleMLP (all but its last layer) composited, and with the last
    layer applied per ray it equals compositing the MLP's colours (the fused ray head identity)."""
    torch.manual_seed(0)
    mlp = SampleMLP(color_dim=6, shape_dim=5, hidden=16, out_channels=7).double()
    cc, sc = torch.rand(2, 3, 4, 6, dtype=torch.float64), torch.rand(2, 3, 4, 5, dtype=torch.float64)
    kw = dict(transmittance=transmittance, density_activation=activation)
    features, weight_sum = mlp_composite_reference(cc, sc, dict(mlp.named_parameters()), **kw)
    hidden, density = mlp.hidden_features(cc, sc)
    torch.testing.assert_close(features, composite_reference(hidden, density, **kw), rtol=0, atol=0)
    color, _ = mlp(cc, sc)
    rays = torch.nn.functional.linear(features, mlp.color_out.weight) + weight_sum * mlp.color_out.bias
    torch.testing.assert_close(rays, composite_reference(color, density, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("transmittance,activation", MODES[:2] + MODES[3:])
def test_gradcheck_fp64(backend, transmittance, activation):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    cc, sc, params = make_inputs((2, 2), 3, 3, 2, 6, 3, torch.float64)
    # Densities clear of zero and pre-activations clear of ReLU's kink, where finite differences disagree.
    params[PARAMETERS.index("density.bias")] += 0.7
    inputs = [t.requires_grad_() for t in (cc, sc, *params)]
    fn = lambda c, s, *p: mlp_composite(
        c, s, p, transmittance=transmittance, density_activation=activation, backend=backend
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("transmittance,activation", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, transmittance, activation, shape):
    cc, sc, params = make_inputs(*shape, device=device)
    check_against_reference(
        cc, sc, params, torch.float32, backend=backend, transmittance=transmittance, density_activation=activation
    )


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:2] + SHAPES[3:], ids=str)
def test_dtypes(backend, device, dtype, shape):
    cc, sc, params = make_inputs(*shape, dtype=dtype, device=device)
    check_against_reference(cc, sc, params, dtype, backend=backend, transmittance="inclusive")


@pytest.mark.parametrize("backend,device", target_params())
def test_many_rays(backend, device):
    """More rays than one tile, block or thread chunk holds, and a count that divides none of them."""
    rays = 3001 if device == "cuda" else (261 if backend == "triton" else 1031)
    cc, sc, params = make_inputs((rays,), 8, 16, 16, 32, 8, device=device)
    check_against_reference(cc, sc, params, torch.float32, backend=backend, transmittance="inclusive")


@pytest.mark.parametrize("backend,device", target_params())
def test_weight_gradients_are_deterministic(backend, device):
    cc, sc, params = make_inputs((300,), 8, 16, 16, 32, 8, device=device)
    grads = [torch.randn(300, 32, device=device), torch.randn(300, 1, device=device)]
    first, second = (run(mlp_composite, cc, sc, params, grads, backend=backend) for _ in range(2))
    for a, b, name in zip(first, second, ["features", "weight_sum", "color_code", "shape_code", *PARAMETERS]):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("used", ["features", "weight_sum"])
def test_one_output_in_the_loss(backend, device, used):
    cc, sc, params = make_inputs((6,), 8, 4, 4, 16, 4, device=device)
    # Semi-transparent rays: through nearly opaque ones d weight_sum / d sigma (~1e-7) is a
    # difference of O(1) terms, which fp32 cannot resolve in any implementation (the reference's too).
    params[PARAMETERS.index("density.weight")] *= 0.1
    got = [t.detach().requires_grad_() for t in (cc, sc, *params)]
    want = [t.detach().double().requires_grad_() for t in (cc, sc, *params)]
    for fn, inputs, kw in ((mlp_composite, got, dict(backend=backend)), (mlp_composite_reference, want, {})):
        out = fn(inputs[0], inputs[1], inputs[2:], **kw)[0 if used == "features" else 1]
        out.square().sum().backward()
    assert 0.2 < out.mean() < 0.8 or used == "features", out.mean()
    for name, a, b in zip(["color_code", "shape_code", *PARAMETERS], got, want):
        # the reference leaves None where the output does not depend on a tensor (the colour branch
        # and weight_sum); the fused op gives zeros there
        assert_close(a.grad, torch.zeros_like(b) if b.grad is None else b.grad, torch.float32, name)


@pytest.mark.parametrize("backend,device", target_params())
def test_empty_batch(backend, device):
    cc, sc, params = make_inputs((0, 3), 8, 4, 4, 16, 4, device=device)
    out = run(
        mlp_composite,
        cc,
        sc,
        params,
        [torch.zeros(0, 3, 16, device=device), torch.zeros(0, 3, 1, device=device)],
        backend=backend,
    )
    assert out[0].shape == (0, 3, 16) and out[1].shape == (0, 3, 1)
    assert all(g.abs().sum() == 0 for g in out[4:]), "no rays: every parameter gradient is zero"


@pytest.mark.parametrize("backend,device", target_params())
def test_params_by_name_and_strided_codes(backend, device):
    """A module's named parameters (extra names ignored) and FNeVR's permuted channel-major codes."""
    torch.manual_seed(0)
    mlp = SampleMLP(color_dim=4, shape_dim=4, hidden=16, out_channels=8).to(device)
    volume = torch.rand(2, 4, 8, 3, 5, device=device)  # [B, e, D, h, w], as the ray sampler makes it
    cc = sc = volume.permute(0, 3, 4, 2, 1)  # [B, h, w, D, e], not contiguous
    got = mlp_composite(cc, sc, dict(mlp.named_parameters()), backend=backend)
    want = mlp_composite(
        cc.contiguous(), sc.contiguous(), [dict(mlp.named_parameters())[n] for n in PARAMETERS], backend="reference"
    )
    for a, b in zip(got, want):
        assert_close(a, b.double(), torch.float32)


@pytest.mark.parametrize("backend,device", target_params())
def test_autocast_runs_in_the_autocast_dtype(backend, device):
    cc, sc, params = make_inputs((3, 4), 8, 16, 16, 32, 8, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        features, weight_sum = mlp_composite(cc, sc, params, backend=backend)
    assert features.dtype == weight_sum.dtype == torch.bfloat16
    want = mlp_composite_reference(
        *(t.to(torch.bfloat16).double() for t in (cc, sc)), [p.to(torch.bfloat16).double() for p in params]
    )
    assert_close(features, want[0], torch.bfloat16, "features", OP_TOL)


BAD_INPUTS = [
    (lambda c, s, p: (c[0, 0], s, p), ValueError, "shape_code's leading dims"),
    (lambda c, s, p: (c, s[:, :2], p), ValueError, "shape_code's leading dims"),
    (lambda c, s, p: (c.double(), s, p), ValueError, "shape_code must have color_code's dtype"),
    (lambda c, s, p: (c, s, p[:3]), ValueError, "sequence of 14 tensors"),
    (lambda c, s, p: (c, s, dict(zip(PARAMETERS[1:], p[1:]))), ValueError, r"missing \['shape_in.weight'\]"),
    (lambda c, s, p: (c, s, p[:10] + [p[10][:, 1:]] + p[11:]), ValueError, r"fuse.weight/.bias must be \[16, 20\]"),
    (lambda c, s, p: (c.long(), s, p), ValueError, "color_code must be float16"),
    (lambda c, s, p: (c, s.to("meta"), p), ValueError, "shape_code must be on color_code's device"),
    (lambda c, s, p: (c.tolist(), s, p), TypeError, "color_code must be a torch.Tensor"),
    (lambda c, s, p: (c, s, p[:-1] + [p[-1].double()]), ValueError, "fuse_hidden.bias must have color_code's dtype"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_input(make, error, match):
    cc, sc, params = make_inputs((2, 3), 8, 4, 4, 16, 4)
    with pytest.raises(error, match=match):
        mlp_composite(*make(cc, sc, params))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(transmittance="cumulative"), ValueError, "transmittance must be one of"),
        (dict(density_activation="tanh"), ValueError, "density_activation must be one of"),
        (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
    ],
)
def test_bad_options(kwargs, error, match):
    cc, sc, params = make_inputs((2, 3), 8, 4, 4, 16, 4)
    with pytest.raises(error, match=match):
        mlp_composite(cc, sc, params, **kwargs)
