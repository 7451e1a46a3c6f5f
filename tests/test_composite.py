"""fnevr.ops.composite: every fused backend against the reference, the reference against the
paper's formula, gradients, layouts, numerical safety, torch.library integration, bad input."""

import itertools
import os

import pytest
import torch

import fnevr
from fnevr.ops import composite, composite_reference
from helpers import assert_close, run_python, target_params

MODES = list(itertools.product(("exclusive", "inclusive"), ("relu", "softplus", "none")))
# (leading ray dims, D, C): D in {1, 2, 8, 13}, C in {1, 3, 256}, 0-3 leading dims, empty.
SHAPES = [
    ((), 8, 3),
    ((5,), 1, 256),
    ((2, 3), 13, 1),
    ((2, 2, 3), 2, 3),
    ((4,), 8, 256),
    ((3,), 13, 256),
    ((0,), 8, 3),
    ((2, 0, 3), 8, 256),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_inputs(lead, D, C, dtype=torch.float32, device="cpu", activation="relu", seed=0):
    g = torch.Generator().manual_seed(seed)
    color = torch.rand(*lead, D, C, generator=g, dtype=torch.float64)
    density = torch.randn(*lead, D, generator=g, dtype=torch.float64) * 1.5
    if activation == "none":  # keep exp(-sum p) moderate: p may be slightly negative
        density = density.abs() - 0.1
    return color.to(device, dtype), density.to(device, dtype)


def reference_and_grads(color, density, grad_out, **kw):
    c = color.detach().double().requires_grad_()
    d = density.detach().double().requires_grad_()
    out = composite_reference(c, d, **kw)
    out.backward(grad_out.double())
    return out, c.grad, d.grad


def run_op(color, density, grad_out, **kw):
    c = color.detach().requires_grad_()
    d = density.detach().requires_grad_()
    out = composite(c, d, **kw)
    out.backward(grad_out)
    return out, c.grad, d.grad


def check_against_reference(color, density, dtype, seed=1, **kw):
    lead_c = color.shape[:-2] + color.shape[-1:]
    grad_out = torch.randn(lead_c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(color.device, color.dtype)
    got = run_op(color, density, grad_out, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    want = reference_and_grads(color, density, grad_out, **ref_kw)
    for name, a, b in zip(("output", "grad color", "grad density"), got, want):
        assert a.dtype == color.dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("transmittance,activation", MODES)
def test_reference_is_the_papers_formula(transmittance, activation):
    color, density = make_inputs((3,), 6, 4, torch.float64, activation=activation)
    act = {"relu": torch.relu, "softplus": torch.nn.functional.softplus, "none": lambda x: x}[activation]
    p = act(density)
    want = torch.zeros(3, 4, dtype=torch.float64)
    for r in range(3):
        for i in range(6):
            depth = p[r, : i + 1].sum() if transmittance == "inclusive" else p[r, :i].sum()
            want[r] += torch.exp(-depth) * (1 - torch.exp(-p[r, i])) * color[r, i]
    got = composite_reference(color, density, transmittance=transmittance, density_activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transmittance,activation", MODES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, transmittance, activation):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    color, density = make_inputs((2, 3), 5, 4, torch.float64, activation=activation)
    if activation == "relu":  # keep clear of relu's kink, where finite differences disagree
        density = torch.where(density.abs() < 0.1, density + 0.3, density)
    fn = lambda c, d: composite(c, d, transmittance=transmittance, density_activation=activation, backend=backend)
    assert torch.autograd.gradcheck(fn, (color.requires_grad_(), density.requires_grad_()))


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("transmittance,activation", MODES)
@pytest.mark.parametrize("lead,D,C", SHAPES, ids=str)
def test_matches_reference(backend, device, transmittance, activation, lead, D, C):
    color, density = make_inputs(lead, D, C, torch.float32, device, activation)
    check_against_reference(
        color, density, torch.float32, backend=backend, transmittance=transmittance, density_activation=activation
    )


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transmittance", ("exclusive", "inclusive"))
@pytest.mark.parametrize("lead,D,C", [((2, 3, 5), 8, 256), ((7,), 13, 3)], ids=str)
def test_dtypes(backend, device, dtype, transmittance, lead, D, C):
    color, density = make_inputs(lead, D, C, dtype, device)
    check_against_reference(color, density, dtype, backend=backend, transmittance=transmittance)


def strided_layouts(device):
    """Inputs that are not plain contiguous [..., D, C] / [..., D] tensors (made on `device`, since
    copying a strided tensor to another device may make it contiguous)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.rand(*shape, generator=g).to(device)
    B, H, W, D, C = 2, 3, 4, 8, 32
    # FNeVR-style channels-last view of a [B, C, D, H, W] field, density [B, H, W, D, 1] likewise.
    cl = (rand(B, C, D, H, W).permute(0, 3, 4, 2, 1), rand(B, 1, D, H, W).permute(0, 3, 4, 2, 1) * 3 - 1)
    # Every other ray and every other channel.
    sl = (rand(6, D, 2 * C)[::2, :, ::2], rand(6, D, 2)[::2, :, 0] * 3 - 1)
    # Contiguous but misaligned by one element: the kernels' vector loads must notice.
    flat = rand(2 + 5 * D * C + 5 * D)
    ma = (flat[1 : 1 + 5 * D * C].view(5, D, C), flat[2 + 5 * D * C :].view(5, D) * 3 - 1)
    return {"channels_last": cl, "sliced": sl, "misaligned": ma}


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "misaligned"])
def test_layouts(backend, device, layout):
    color, density = strided_layouts(device)[layout]
    assert not (color.is_contiguous() and density.is_contiguous()) or layout == "misaligned"
    check_against_reference(color, density, torch.float32, backend=backend, transmittance="inclusive")


@pytest.mark.parametrize("backend,device", target_params())
def test_density_with_trailing_one(backend, device):
    color, density = make_inputs((2, 3), 8, 16, device=device)
    density = density.unsqueeze(-1).requires_grad_()
    out = composite(color, density, backend=backend)
    out.sum().backward()
    assert density.grad.shape == density.shape
    check_against_reference(color, density.detach(), torch.float32, backend=backend)


@pytest.mark.parametrize("backend,device", target_params() + [pytest.param("reference", "cpu", id="reference-cpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transmittance", ("exclusive", "inclusive"))
def test_huge_and_zero_densities_are_safe(backend, device, dtype, transmittance):
    huge = torch.finfo(dtype).max / 4
    color, _ = make_inputs((3,), 6, 5, dtype, device)
    density = torch.tensor(
        [[huge] * 6, [0.0, huge, 1.0, huge, 0.5, huge], [0.0] * 6], dtype=dtype, device=device
    ).requires_grad_()
    color.requires_grad_()
    out = composite(color, density, transmittance=transmittance, backend=backend)
    out.backward(torch.ones_like(out))
    for t in (out, color.grad, density.grad):
        assert t.isfinite().all(), t
    assert torch.all(out[2] == 0), "zero densities must composite to exactly zero"
    check_against_reference(color.detach(), density.detach(), dtype, backend=backend, transmittance=transmittance)


BAD_INPUTS = [
    (lambda c, d: (c[0, 0, 0], d[0, 0, 0]), ValueError, "color must be"),
    (lambda c, d: (c, d[:1]), ValueError, "leading"),
    (lambda c, d: (c, d[..., :-1]), ValueError, "D=7 samples"),
    (lambda c, d: (c, d.unsqueeze(-1).expand(*d.shape, 2)), ValueError, r"density must be \[\.\.\., D\]"),
    (lambda c, d: (c, d.double()), ValueError, "same dtype"),
    (lambda c, d: (c.long(), d.long()), ValueError, "color must be float16"),
    (lambda c, d: (c, d.to("meta")), ValueError, "same device"),
    (lambda c, d: (c.tolist(), d), TypeError, "color must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_tensors(make, error, match):
    color, density = make_inputs((2, 3), 8, 4)
    with pytest.raises(error, match=match):
        composite(*make(color, density))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(transmittance="cumulative"), ValueError, "transmittance must be one of"),
        (dict(density_activation="tanh"), ValueError, "density_activation must be one of"),
        (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run on cpu tensors"),
    ],
)
def test_bad_options(kwargs, error, match):
    color, density = make_inputs((2, 3), 8, 4)
    with pytest.raises(error, match=match):
        composite(color, density, **kwargs)


def test_import_without_extension_falls_back_with_one_warning():
    proc = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, fnevr
        assert len(caught) == 1 and "compiled kernels are unavailable" in str(caught[0].message), caught
        assert fnevr.ops.backends()["cpu"].startswith("unavailable: disabled by FNEVR_NO_EXTENSION")
        c, d = torch.rand(3, 8, 4), torch.randn(3, 8)
        assert torch.equal(fnevr.ops.composite(c, d), fnevr.ops.composite_reference(c, d))
        try:
            fnevr.ops.composite(c, d, backend="cpu")
        except RuntimeError as err:
            assert "FNEVR_NO_EXTENSION" in str(err), err
        else:
            raise AssertionError("backend='cpu' should have failed")
        print("ok")
    """,
        FNEVR_NO_EXTENSION="1",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled Triton backend is available")
def test_triton_without_gpu_or_interpreter_says_why():
    proc = run_python("""
        import torch, fnevr
        print(fnevr.ops.backends()["triton"])
        fnevr.ops.composite(torch.rand(3, 8, 4), torch.randn(3, 8), backend="triton")
    """)
    assert "TRITON_INTERPRET=1" in proc.stdout
    assert "RuntimeError: backend='triton' cannot run on cpu tensors" in proc.stderr


def test_extension_was_built_where_expected():
    """CI and GPU runs set FNEVR_EXPECT_BUILD=cpu[,cuda], so a silently skipped build fails here."""
    expected = {s for s in os.environ.get("FNEVR_EXPECT_BUILD", "").split(",") if s}
    from fnevr import _extension

    if "cpu" in expected:
        assert _extension.cpu is not None, _extension.cpu_reason
    if "cuda" in expected:
        assert _extension.cuda is not None, _extension.cuda_reason
    if not expected:
        pytest.skip("FNEVR_EXPECT_BUILD is not set")
