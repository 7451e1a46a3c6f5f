"""NaN and ±inf go through every fused backend exactly as through its reference: the output and every
input gradient are NaN where the reference's are, ±inf where they are, and close elsewhere. Per op,
the non-finite value sits in an input, a density, a weight or the incoming gradient."""

import pytest
import torch
from helpers import target_params

from fnevr.ops import composite, grid_sample, mlp_composite, spade_norm
from fnevr.ops.mlp_composite import PARAMETERS

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def compare(run, inputs, grad_out, backend, device, what, loose=()):
    """run(*inputs, backend=...) -> output(s), through the fused backend (fp32, on its device) and the
    reference (fp64, CPU). Outputs and gradients must be NaN exactly where the reference's are, ±inf
    where they are, and close elsewhere.

    ``loose``: {input index: "rays" or "tensor"} for the gradients that sum along a ray through
    ``cumsum``. There the reference's pattern within a poisoned ray is how autograd happens to
    difference cumulative sums (inf - inf gives NaN at samples the poisoned one does not reach), and
    the fused backward's running sums poison the ray in their own order. Those gradients must be
    non-finite in the same rays (first dimension), or for a parameter, which sums over all rays,
    both or neither be non-finite; and close where both are finite."""
    results = []
    for name, dev, dtype in (("reference", "cpu", torch.float64), (backend, device, torch.float32)):
        xs = [t.to(dev, dtype).requires_grad_() for t in inputs]
        out = run(*xs, backend=name)
        outs = out if isinstance(out, tuple) else (out,)
        grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
        grads_in = torch.autograd.grad(outs, xs, [g.to(dev, dtype) for g in grads], allow_unused=True)
        results.append([o.detach().cpu().double() for o in outs]
                       + [g.detach().cpu().double() if g is not None else torch.zeros_like(x.cpu().double())
                          for g, x in zip(grads_in, xs)])
    n_out = len(results[0]) - len(inputs)
    for i, (ref, got) in enumerate(zip(*results)):
        where = f"{what}: " + (f"output {i}" if i < n_out else f"gradient of input {i - n_out}")
        if i - n_out in loose:
            rows = ref.shape[0] if loose[i - n_out] == "rays" else 1
            bad_ref = (~ref.reshape(rows, -1).isfinite()).any(1)
            bad_got = (~got.reshape(rows, -1).isfinite()).any(1)
            assert torch.equal(bad_ref, bad_got), f"{where}: non-finite rows {bad_ref.tolist()} != {bad_got.tolist()}"
        else:
            assert torch.equal(ref.isnan(), got.isnan()), \
                f"{where}: NaN differs at {(ref.isnan() ^ got.isnan()).nonzero()[:4].tolist()}"
            for sign in (1, -1):
                assert torch.equal(ref == sign * torch.inf, got == sign * torch.inf), f"{where}: {sign:+d} inf differs"
        finite = ref.isfinite() & got.isfinite()
        if finite.any():
            scale = ref[finite].abs().max().clamp_min(1e-6)
            err = ((got[finite] - ref[finite]).abs().max() / scale).item()
            assert err < 1e-4, f"{where}: error {err:.3g}"


def poison(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["color", "density", "grad"])
@pytest.mark.parametrize("activation", ["relu", "softplus", "none"])
def test_composite(backend, device, value, where, activation):
    g = torch.Generator().manual_seed(0)
    color = torch.rand(3, 6, 4, generator=g, dtype=torch.float64)
    density = torch.randn(3, 6, 1, generator=g, dtype=torch.float64).abs() + 0.1
    density[1, 0] = -0.5  # a sample relu zeroes
    grad = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v = VALUES[value]
    if where == "color":
        color = poison(color, 4 * 2 + 1, v)  # ray 0, sample 2
    elif where == "density":
        density = poison(density, 6 + 2, v)  # ray 1, sample 2
    else:
        grad = poison(grad, 5, v)  # ray 1
    for transmittance in ("exclusive", "inclusive"):
        compare(lambda c, d, backend: composite(c, d, transmittance=transmittance, density_activation=activation,
                                                backend=backend),
                [color, density], grad, backend, device, f"{where}={value} {transmittance}",
                loose={1: "rays"})


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["input", "grid", "grad"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample(backend, device, value, where, padding):
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
    compare(lambda a, b, backend: grid_sample(a, b, padding_mode=padding, align_corners=False, backend=backend),
            [x, grid], grad, backend, device, f"{where}={value}")


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["x", "gamma", "beta", "grad"])
@pytest.mark.parametrize("norm, activation", [("instance", None), ("instance", "relu"), ("batch", "leaky_relu")])
def test_spade_norm(backend, device, value, where, norm, activation):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    gamma = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    beta = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    v = VALUES[value]
    if where == "x":
        x = poison(x, 21, v)  # sample 0, channel 1
    elif where == "gamma":
        gamma = poison(gamma, 21, v)
    elif where == "beta":
        beta = poison(beta, 21, v)
    else:
        grad = poison(grad, 21, v)
    compare(lambda a, b, c, backend: spade_norm(a, b, c, norm=norm, activation=activation, backend=backend),
            [x, gamma, beta], grad, backend, device, f"{where}={value}")


@pytest.mark.parametrize("backend, device", target_params())
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["color_code", "shape_code", "shape_in.weight", "density.bias", "fuse.weight",
                                   "grad_features", "grad_weight_sum"])
def test_mlp_composite(backend, device, value, where):
    g = torch.Generator().manual_seed(3)
    R, D, Ec, Es, H, H4 = 3, 4, 8, 8, 16, 8
    color = torch.randn(R, D, Ec, generator=g, dtype=torch.float64)
    shape = torch.randn(R, D, Es, generator=g, dtype=torch.float64)
    sizes = {"shape_in": (H, Es), "shape_hidden": (H, H), "density": (1, H), "shape_feature": (H4, H),
             "color_in": (H, Ec), "fuse": (H, H4 + H), "fuse_hidden": (H, H)}
    params = {}
    for name in PARAMETERS:
        layer, kind = name.split(".")
        out, inp = sizes[layer]
        params[name] = (torch.randn((out, inp) if kind == "weight" else (out,), generator=g, dtype=torch.float64)
                        / inp ** 0.5)
    params["density.bias"] += 0.5
    gf = torch.randn(R, H, generator=g, dtype=torch.float64)
    gs = torch.randn(R, 1, generator=g, dtype=torch.float64)
    v = VALUES[value]
    if where == "color_code":
        color = poison(color, Ec * 1 + 2, v)  # ray 0, sample 1
    elif where == "shape_code":
        shape = poison(shape, D * Es + Es + 3, v)  # ray 1, sample 1
    elif where == "grad_features":
        gf = poison(gf, H + 2, v)
    elif where == "grad_weight_sum":
        gs = poison(gs, 1, v)
    else:
        params[where] = poison(params[where], 0, v)
    names = list(PARAMETERS)

    def run(c, s, *ps, backend):
        return mlp_composite(c, s, dict(zip(names, ps)), backend=backend)

    compare(run, [color, shape, *params.values()], (gf, gs), backend, device, f"{where}={value}",
            loose={0: "rays", 1: "rays", **{i: "tensor" for i in range(2, 16)}})


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_spade_norm_refuses_a_bad_eps(eps):
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        spade_norm(x, x, x, eps=eps, backend="reference")
