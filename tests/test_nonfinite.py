"""NaN and ±inf go through every fused backend exactly as through its reference: the output and every
input gradient are NaN where the reference's are, +inf where they are, -inf where they are, and
close elsewhere. Per op, the non-finite value sits in an input, a density, a weight or the incoming
gradient. Shapes are small: the Triton cases run through the interpreter on a machine without a GPU."""

import pytest
import torch

from fnevr.ops import composite, grid_sample, mlp_composite, spade_norm
from fnevr.ops.mlp_composite import PARAMETERS, layer_shapes
from helpers import TOL, target_params

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}

# numpy (Triton's interpreter) warns of the inf - inf and 0 * inf these cases are made of
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def compare(run, inputs, grad_out, backend, device, what):
    """run(*inputs, backend=...) -> output(s), through the fused backend (fp32, on its device) and the
    reference (fp64, CPU) on the same fp32-rounded values. Outputs and the gradients of every input
    must be NaN exactly where the reference's are, +inf and -inf exactly where its are, and within
    helpers.TOL of it (relative to its largest finite magnitude) where both are finite."""
    inputs = [t.float().double() for t in inputs]
    grad_out = [g.float().double() for g in (grad_out if isinstance(grad_out, tuple) else (grad_out,))]
    results = []
    for name, dev, dtype in (("reference", "cpu", torch.float64), (backend, device, torch.float32)):
        xs = [t.to(dev, dtype).requires_grad_() for t in inputs]
        out = run(*xs, backend=name)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, xs, [g.to(dev, dtype) for g in grad_out], allow_unused=True)
        results.append(
            [o.detach().cpu().double() for o in outs]
            + [
                g.detach().cpu().double() if g is not None else torch.zeros_like(x.cpu().double())
                for g, x in zip(grads, xs)
            ]
        )
    n_out = len(results[0]) - len(inputs)
    for i, (ref, got) in enumerate(zip(*results)):
        where = f"{what}: " + (f"output {i}" if i < n_out else f"gradient of input {i - n_out}")
        assert torch.equal(ref.isnan(), got.isnan()), (
            f"{where}: NaN differs at {(ref.isnan() ^ got.isnan()).nonzero()[:4].tolist()}"
        )
        for sign in (1, -1):
            r, g = ref == sign * torch.inf, got == sign * torch.inf
            assert torch.equal(r, g), f"{where}: {sign * torch.inf} differs at {(r ^ g).nonzero()[:4].tolist()}"
        finite = ref.isfinite()
        if finite.any():
            scale = ref[finite].abs().max().clamp_min(1e-30)
            err = ((got[finite] - ref[finite]).abs().max() / scale).item()
            assert err <= TOL[torch.float32], f"{where}: error {err:.3g} x max|ref|"


def poison(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["color", "density", "grad"])
# D=37: past Triton's unrolled loop over the samples
@pytest.mark.parametrize("activation, D", [("relu", 6), ("softplus", 6), ("none", 6), ("relu", 37)])
def test_composite(backend, device, value, where, activation, D):
    g = torch.Generator().manual_seed(0)
    C = 4
    color = torch.rand(3, D, C, generator=g, dtype=torch.float64)
    density = torch.rand(3, D, 1, generator=g, dtype=torch.float64) * 0.5 + 0.05
    density[1, 0] = -0.5  # a sample relu zeroes
    grad = torch.randn(3, C, generator=g, dtype=torch.float64)
    v, k = VALUES[value], D // 3  # the poisoned sample: some before it and some behind
    if where == "color":
        color = poison(color, k * C + 1, v)  # ray 0
    elif where == "density":
        density = poison(density, D + k, v)  # ray 1
    else:
        grad = poison(grad, C + 1, v)  # ray 1
    for transmittance in ("exclusive", "inclusive"):
        compare(
            lambda c, d, backend: composite(
                c, d, transmittance=transmittance, density_activation=activation, backend=backend
            ),
            [color, density],
            grad,
            backend,
            device,
            f"{where}={value} {transmittance}",
        )


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("transmittance", ["exclusive", "inclusive"])
def test_composite_several_in_one_ray(backend, device, transmittance):
    """+inf and -inf colours in one ray (NaN from the sample of the first on), a NaN colour behind an
    infinite density in another: each poisons the samples in front of it, and no more."""
    g = torch.Generator().manual_seed(4)
    color = torch.rand(3, 7, 2, generator=g, dtype=torch.float64)
    density = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.1
    color[0, 1, 0], color[0, 4, 1] = float("inf"), float("-inf")
    color[1, 5, 0], density[1, 2] = float("nan"), float("inf")
    color[2, 3, 1] = float("inf")
    grad = torch.randn(3, 2, generator=g, dtype=torch.float64)
    for activation in ("relu", "none"):
        compare(
            lambda c, d, backend: composite(
                c, d, transmittance=transmittance, density_activation=activation, backend=backend
            ),
            [color, density],
            grad,
            backend,
            device,
            activation,
        )


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["input", "grid", "grad"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode, align_corners", [("bilinear", False), ("nearest", True)])
def test_grid_sample(backend, device, value, where, padding, mode, align_corners):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    grid = torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9
    grad = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)
    v = VALUES[value]
    if where == "input":
        x = poison(x, 7, v)
    elif where == "grid":
        grid = poison(grid, 5, v)
    else:
        grad = poison(grad, 9, v)
    compare(
        lambda a, b, backend: grid_sample(
            a, b, mode=mode, padding_mode=padding, align_corners=align_corners, backend=backend
        ),
        [x, grid],
        grad,
        backend,
        device,
        f"{where}={value}",
    )


_FIXED_POINT = pytest.mark.xfail(
    strict=True,
    reason=(
        "deterministic grid_sample backward on CUDA/Triton sums grad_input in 64-bit fixed point, which has no "
        "NaN or inf: a non-finite grad_out makes all of grad_input NaN (see fnevr.ops.grid_sample)"
    ),
)


@pytest.mark.parametrize(
    "backend, device",
    [
        pytest.param(*p.values, id=p.id, marks=list(p.marks) + ([] if p.values[0] == "cpu" else [_FIXED_POINT]))
        for p in target_params()
    ],
)
@pytest.mark.parametrize("value", ["nan", "+inf"])
def test_grid_sample_deterministic_grad(backend, device, value):
    """deterministic=True with a non-finite grad_out (the CPU kernel is deterministic without fixed point)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    grid = torch.rand(1, 4, 3, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9
    grad = poison(torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64), 4, VALUES[value])
    compare(
        lambda a, b, backend: grid_sample(
            a, b, backend=backend, **({} if backend == "reference" else {"deterministic": True})
        ),
        [x, grid],
        grad,
        backend,
        device,
        f"grad={value}",
    )


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["x", "gamma", "beta", "grad"])
# instance NCHW: the one-pass kernels; the others: the statistics, forward and backward passes
# (batch norm's are slow through the interpreter: once)
@pytest.mark.parametrize(
    "norm, activation, channels_last",
    [("instance", "relu", False), ("instance", "leaky_relu", True), ("batch", "relu", True)],
)
def test_spade_norm(backend, device, value, where, norm, activation, channels_last):
    g = torch.Generator().manual_seed(2)
    x, gamma, beta, grad = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(4))
    v = VALUES[value]
    if where == "x":
        x = poison(x, 21, v)  # sample 0, channel 1
    elif where == "gamma":
        gamma = poison(gamma, 21, v)
    elif where == "beta":
        beta = poison(beta, 21, v)
    else:
        grad = poison(grad, 21, v)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(a, b, c, backend):
        return spade_norm(a.to(memory_format=fmt), b, c, norm=norm, activation=activation, backend=backend)

    compare(run, [x, gamma, beta], grad, backend, device, f"{where}={value}")


MLP_POSITIONS = [
    "color_code",
    "shape_code",
    "shape_in.weight",
    "shape_hidden.bias",
    "density.weight",
    "density.bias",
    "color_in.bias",
    "fuse.weight",
    "fuse_hidden.bias",
    "grad_features",
    "grad_weight_sum",
]
# (R, D, transmittance, activation, where, widths Ec, Es, H, H4): every position with D=3 (padded
# samples in Triton's tile) and widths that are no power of two (padded channels); some with D=4
# (exclusive), with widths Triton pads nowhere (no channel masks), and with D=40 (a ray in two
# chunks of Triton's backward, whose first pass finds the totals: slow through the interpreter).
ODD, EVEN = (5, 7, 12, 6), (16, 16, 16, 16)
MLP_CASES = (
    [(3, 3, "inclusive", "relu", w, ODD) for w in MLP_POSITIONS]
    + [
        (3, 4, "exclusive", "relu", w, ODD)
        for w in ("color_code", "shape_code", "density.bias", "grad_features", "grad_weight_sum")
    ]
    + [(3, 3, "inclusive", "relu", w, EVEN) for w in ("fuse_hidden.bias", "grad_features")]
    + [(2, 40, "inclusive", "softplus", w, ODD) for w in ("color_code", "density.bias", "grad_weight_sum")]
)


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize(
    "R, D, transmittance, activation, where, widths",
    [
        pytest.param(
            *case, id=f"R{case[0]}-D{case[1]}-{case[2]}-{case[3]}-{case[4]}-{'odd' if case[5] == ODD else 'pow2'}"
        )
        for case in MLP_CASES
    ],
)
def test_mlp_composite(backend, device, value, R, D, transmittance, activation, where, widths):
    g = torch.Generator().manual_seed(3)
    Ec, Es, H, H4 = widths
    color = torch.randn(R, D, Ec, generator=g, dtype=torch.float64)
    shape = torch.randn(R, D, Es, generator=g, dtype=torch.float64)
    sizes = layer_shapes(Ec, Es, H, H4)
    params = {}
    for name in PARAMETERS:
        layer, kind = name.split(".")
        out, inp = sizes[layer]
        params[name] = (
            torch.randn((out, inp) if kind == "weight" else (out,), generator=g, dtype=torch.float64) / inp**0.5
        )
    params["density.bias"] += 0.5
    gf = torch.randn(R, H, generator=g, dtype=torch.float64)
    gs = torch.randn(R, 1, generator=g, dtype=torch.float64)
    v, k = VALUES[value], D // 2
    if where == "color_code":
        color = poison(color, k * Ec + 2, v)  # ray 0
    elif where == "shape_code":
        shape = poison(shape, (D + k) * Es + 3, v)  # ray 1
    elif where == "grad_features":
        gf = poison(gf, H + 2, v)
    elif where == "grad_weight_sum":
        gs = poison(gs, 1, v)
    else:
        params[where] = poison(params[where], 0, v)
    names = list(PARAMETERS)

    def run(c, s, *ps, backend):
        return mlp_composite(
            c, s, dict(zip(names, ps)), transmittance=transmittance, density_activation=activation, backend=backend
        )

    compare(run, [color, shape, *params.values()], (gf, gs), backend, device, f"{where}={value}")


@pytest.mark.parametrize("eps", [-1.0, -1e-12, float("nan"), float("inf"), "1e-5", None])
def test_spade_norm_refuses_a_bad_eps(eps):
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"spade_norm: eps must be a finite number >= 0, got "):
        spade_norm(x, x, x, eps=eps, backend="reference")


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), float("-inf")])
def test_spade_norm_refuses_a_bad_negative_slope(slope):
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"spade_norm: negative_slope must be a finite number, got "):
        spade_norm(x, x, x, activation="leaky_relu", negative_slope=slope, backend="reference")


@pytest.mark.parametrize("backend, device", target_params() + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_spade_norm_takes_eps_zero(backend, device):
    """eps = 0 is allowed, as in PyTorch's norms: finite wherever a group's variance is not 0."""
    x = torch.randn(2, 3, 4, 4, device=device)
    y = spade_norm(x, torch.zeros_like(x), torch.zeros_like(x), eps=0, backend=backend)
    want = torch.nn.functional.instance_norm(x.cpu(), eps=0)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-4, atol=1e-4)


def test_sync_batch_norm_refuses_a_bad_eps():
    from fnevr.nn import SyncBatchNorm

    with pytest.raises(ValueError, match=r"SyncBatchNorm: eps must be a finite number >= 0, got -0.001"):
        SyncBatchNorm(4, eps=-1e-3)
