"""fnevr.ops.grid_sample: the reference and every fused backend against torch.nn.functional.grid_sample
in fp64 for every option, gradients (first and second order), determinism, layouts, non-finite
grids, torch.library integration, bad input."""

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F

import fnevr
from fnevr.ops import _fused, grid_sample, grid_sample_reference
from helpers import assert_close, run_python, target_params

OPTIONS = list(itertools.product(("bilinear", "nearest"), ("zeros", "border", "reflection"), (False, True)))
OPTION_IDS = [f"{m}-{p}-{'ac' if a else 'noac'}" for m, p, a in OPTIONS]
# (N, C, H, W, Ho, Wo): C in {1, 3, 256}, output larger/smaller than the input, 1-pixel axes, N = 0.
SHAPES = [
    (2, 3, 5, 7, 4, 6),
    (1, 1, 4, 4, 9, 3),
    (2, 256, 6, 5, 3, 4),
    (0, 3, 4, 4, 2, 2),
    (2, 4, 1, 1, 3, 3),
    (1, 2, 1, 5, 3, 2),
]
TRITON_SHAPES = [(2, 3, 5, 7, 4, 6), (1, 65, 4, 3, 2, 5)]  # the interpreter is slow: few, small (65: both tilings)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
WITH_REFERENCE = target_params() + [pytest.param("reference", "cpu", id="reference-cpu")]


def make_inputs(N, C, H, W, Ho, Wo, dtype=torch.float64, device="cpu", layout="contiguous", spread=3.0, seed=0):
    """input [N, C, H, W] in `layout` and grid [N, Ho, Wo, 2] uniform in [-spread, spread] (so
    many points fall outside the image), both made on `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    grid = (torch.rand(N, Ho, Wo, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread
    x, grid = x.to(device, dtype), grid.to(device, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other channel and column; the grid transposed
        x = torch.cat([x, x], 1).repeat_interleave(2, 3)[:, ::2, :, ::2]
        grid = grid.transpose(1, 2).contiguous().transpose(1, 2)
    return x, grid


def torch_reference(x, grid, grad_out, mode, padding, align_corners):
    """PyTorch's own op in fp64: (output, grad input, grad grid)."""
    xd = x.detach().double().requires_grad_()
    gd = grid.detach().double().requires_grad_()
    out = F.grid_sample(xd, gd, mode=mode, padding_mode=padding, align_corners=align_corners)
    gi, gg = torch.autograd.grad(out, (xd, gd), grad_out.double()) if out.numel() else (xd * 0, gd * 0)
    return out, gi, gg


def run_op(x, grid, grad_out, mode, padding, align_corners, **kw):
    xr = x.detach().requires_grad_()
    gr = grid.detach().requires_grad_()
    out = grid_sample(xr, gr, mode, padding, align_corners, **kw)
    gi, gg = torch.autograd.grad(out, (xr, gr), grad_out) if out.numel() else (xr * 0, gr * 0)
    return out, gi, gg


def check_against_torch(x, grid, dtype, mode, padding, align_corners, seed=1, **kw):
    N, C, _, _ = x.shape
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(N, C, *grid.shape[1:3], generator=gen, dtype=torch.float64).to(x.device, dtype)
    got = run_op(x, grid, grad_out, mode, padding, align_corners, **kw)
    want = torch_reference(x, grid, grad_out, mode, padding, align_corners)
    for name, a, b in zip(("output", "grad input", "grad grid"), got, want):
        assert a.dtype == x.dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, b, dtype, name)
    return got


@pytest.mark.parametrize("mode,padding,align_corners", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_pytorch(mode, padding, align_corners, shape):
    x, grid = make_inputs(*shape)
    check_against_torch(x, grid, torch.float64, mode, padding, align_corners, backend="reference")


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("mode,padding,align_corners", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_pytorch(backend, device, mode, padding, align_corners, layout):
    shapes = TRITON_SHAPES if backend == "triton" and device == "cpu" else SHAPES
    for shape in shapes:
        x, grid = make_inputs(*shape, device=device, layout=layout)
        out, gi, _ = check_against_torch(x, grid, torch.float64, mode, padding, align_corners, backend=backend)
        if layout == "channels_last" and shape[0] > 0 and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
            assert gi.is_contiguous(memory_format=torch.channels_last), "grad input must keep channels_last"


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(backend, device, seed):
    g = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    interp = backend == "triton" and device == "cpu"
    shape = (r(1, 3), r(1, 40 if interp else 300), r(1, 9), r(1, 9), r(1, 9), r(1, 9))
    mode, padding, align_corners = OPTIONS[r(0, len(OPTIONS) - 1)]
    layout = ("contiguous", "channels_last", "strided")[seed % 3]
    x, grid = make_inputs(*shape, device=device, layout=layout, seed=seed)
    check_against_torch(x, grid, torch.float64, mode, padding, align_corners, backend=backend)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(backend, device, dtype, layout):
    shape = (2, 16, 5, 6, 4, 3) if backend == "triton" and device == "cpu" else (2, 256, 8, 8, 8, 8)
    x, grid = make_inputs(*shape, dtype=dtype, device=device, layout=layout, spread=1.2)
    for padding in ("zeros", "reflection"):
        check_against_torch(x, grid, dtype, "bilinear", padding, False, backend=backend)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("mode,padding,align_corners", OPTIONS, ids=OPTION_IDS)
def test_non_finite_and_huge_grids(backend, device, mode, padding, align_corners):
    """NaN and +-inf follow PyTorch's CUDA kernels, which equal PyTorch's op (on any device) at a
    stand-in value: with zeros, any finite value far outside (output 0, gradients 0); with border,
    -1e30 or 1e30 (the clipped edge) and, for NaN, the grid value whose pixel coordinate is exactly
    0; with reflection, that value for all three. Huge finite values need no stand-in."""
    x, grid = make_inputs(2, 3, 4, 4, 3, 5, device=device)  # W = H = 4: the stand-in for 0 is exact
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], dtype=torch.float64)
    flat = grid.view(-1)
    flat[torch.arange(0, flat.numel(), 3)] = bad.repeat(flat.numel())[: len(range(0, flat.numel(), 3))].to(device)
    zero_at = -1.0 if align_corners else 1.0 / 4 - 1.0
    stand_in = grid.clone()
    nan, pinf, ninf = grid.isnan(), grid == float("inf"), grid == -float("inf")
    if padding == "zeros":
        stand_in[nan | pinf | ninf] = 1e30
    elif padding == "border":
        stand_in[nan], stand_in[pinf], stand_in[ninf] = zero_at, 1e30, -1e30
    else:
        stand_in[nan | pinf | ninf] = zero_at
        stand_in[stand_in.abs() > 1e20] = zero_at  # PyTorch's reflection of 1e30 overflows an int
        grid[grid.abs() > 1e20] = zero_at
    grad_out = torch.randn(2, 3, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    got = run_op(x, grid, grad_out, mode, padding, align_corners, backend=backend)
    want = torch_reference(x, stand_in, grad_out, mode, padding, align_corners)
    for name, a, b in zip(("output", "grad input", "grad grid"), got, want):
        assert a.isfinite().all(), f"{name} is not finite"
        assert_close(a, b, torch.float64, name)


# Nearest's rint at ties and next to them: x + 1/2 rounds up to 1 at x = 1/2 - 2^-25 in fp32, and
# rounding halves away from zero misses the ties (-1/2 reads pixel 0, 9/2 pixel 4). With
# align_corners, x = (g + 1) / 2 * (size - 1) is exact for these grid values (in fp32 and fp64, but
# 1/2 - 2^-54: fp64's 1/2 - 2^-25, a tie in fp32): along an axis of 2 pixels x = (g + 1) / 2, along
# one of 5, x = 2 (g + 1).
NEAR_HALF = [-(2.0**-24), -(2.0**-53), 0.0, 2.0**-23, -2.0, -1.0, 1.0, 2.0]  # x = 1/2 - 2^-25, 1/2 - 2^-54, 1/2, ...
TIES = [
    -1.25,
    -0.75,
    -0.25,
    0.25,
    0.75,
    1.25,
    0.25 - 2.0**-23,
    -0.25 + 2.0**-23,
]  # x = -1/2, ..., 9/2, 5/2 - 2^-22, ...


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nearest_rounds_half_to_even_exactly(backend, device, dtype):
    for transpose in (False, True):  # the near-halves along x, then along y
        g_small, g_ties = torch.meshgrid(
            torch.tensor(NEAR_HALF, dtype=torch.float64), torch.tensor(TIES, dtype=torch.float64), indexing="ij"
        )
        grid = torch.stack((g_ties, g_small) if transpose else (g_small, g_ties), -1)[None]
        H, W = (2, 5) if transpose else (5, 2)
        x = torch.arange(1.0, 1 + 3 * H * W, dtype=torch.float64).reshape(1, 3, H, W)  # 0 means "outside"
        grad_out = torch.arange(1.0, 1 + 3 * grid.shape[1] * grid.shape[2], dtype=torch.float64)
        grad_out = grad_out.reshape(1, 3, *grid.shape[1:3])
        want = torch_reference(x, grid, grad_out, "nearest", "zeros", True)
        got = run_op(
            x.to(device, dtype),
            grid.to(device, dtype),
            grad_out.to(device, dtype),
            "nearest",
            "zeros",
            True,
            backend=backend,
        )
        for name, a, b in zip(("output", "grad input"), got, want):
            assert torch.equal(a.cpu().double(), b), f"{name} (transpose={transpose}): {a.cpu().double() - b}"


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_nearest_rounds_large_coordinates_exactly(backend, device):
    """fp32 odd integers in [2^23, 2^24): x + 1/2 is a tie there, and rounds up to the next even
    integer. An axis of 2^24 + 1 pixels reaches them exactly: x = (g + 1) 2^23 (align_corners)."""
    W = 2**24 + 1
    x = (torch.arange(W, dtype=torch.float64) % 4096 + 1).reshape(1, 1, 1, W)  # neighbours differ
    gx = torch.tensor([2.0**-23, 3 * 2.0**-23, 1 - 2.0**-23, -0.5 + 2.0**-24], dtype=torch.float64)  # 2^23 + 1, ...
    grid = torch.stack((gx, torch.zeros_like(gx)), -1).reshape(1, 1, -1, 2)
    want = F.grid_sample(x, grid, "nearest", "zeros", align_corners=True)
    got = grid_sample(
        x.to(device, torch.float32), grid.to(device, torch.float32), "nearest", "zeros", True, backend=backend
    )
    assert torch.equal(got.cpu().double(), want), (got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mode,padding,align_corners", OPTIONS, ids=OPTION_IDS)
def test_gradcheck_fp64(backend, mode, padding, align_corners):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    if backend == "triton" and (mode, align_corners) != ("bilinear", False):
        pytest.skip("the interpreter is slow: one mode each")
    x, grid = make_inputs(1, 2, 3, 4, 2, 3, spread=1.3)
    grid.requires_grad_(mode == "bilinear")  # nearest: the grid's gradient is 0 but not its difference quotient
    fn = lambda a, b: grid_sample(a, b, mode, padding, align_corners, backend=backend)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), grid))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("wrt", ["input", "input+grid"])
@pytest.mark.parametrize("padding", ["zeros", "reflection"])
def test_gradgradcheck_fp64(backend, wrt, padding):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    if backend == "triton" and padding != "zeros":
        pytest.skip("the interpreter is slow: one padding")
    x, grid = make_inputs(1, 2, 3, 4, 2, 3, spread=1.3)
    grid.requires_grad_(wrt == "input+grid")  # input only: the fused kernels; with grid: the reference
    fn = lambda a, b: grid_sample(a, b, "bilinear", padding, False, backend=backend)
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), grid))


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("how", ["argument", "global"])
def test_deterministic_backward_is_bit_identical(backend, device, layout, how):
    interp = backend == "triton" and device == "cpu"
    # Many output points per input pixel (a zoom-in), so the scatter has many colliding terms.
    x, grid = make_inputs(
        2,
        8 if interp else 64,
        4,
        4,
        8 if interp else 32,
        8 if interp else 32,
        torch.float32,
        device,
        layout,
        spread=1.0,
    )
    grad_out = torch.randn(x.shape[:2] + grid.shape[1:3], device=device)

    def grads():
        a, b = x.clone().requires_grad_(), grid.clone().requires_grad_()
        if how == "argument":
            out = grid_sample(a, b, "bilinear", "border", True, backend=backend, deterministic=True)
        else:
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                out = grid_sample(a, b, "bilinear", "border", True, backend=backend)
            finally:
                torch.use_deterministic_algorithms(previous)
        return torch.autograd.grad(out, (a, b), grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b) and a.stride() == b.stride()
    want = torch_reference(x, grid, grad_out, "bilinear", "border", True)
    assert_close(first[0], want[1], torch.float32, "grad input")
    assert_close(first[1], want[2], torch.float32, "grad grid")


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_align_corners_none_means_false_without_warning(backend, device, recwarn):
    x, grid = make_inputs(1, 2, 4, 4, 3, 3, torch.float32, device)
    out = grid_sample(x, grid, align_corners=None, backend=backend)
    torch.testing.assert_close(out, grid_sample(x, grid, align_corners=False, backend=backend))
    assert not [w for w in recwarn if "align_corners" in str(w.message)]


@pytest.mark.parametrize("backend,device", target_params([("triton", "cpu"), ("triton", "cuda")]))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_programs_that_loop_over_channels(backend, device, layout, monkeypatch):
    """A program takes several steps of channels when there are enough programs without (large
    launches); forced here by asking for one program per tile of points."""
    from fnevr.kernels import grid_sample as kernels

    monkeypatch.setattr(kernels, "_PROGRAMS", 1)
    x, grid = make_inputs(2, 70, 3, 4, 3, 5, device=device, layout=layout)  # 70: a partial last step
    for deterministic in (False, True):
        check_against_torch(
            x, grid, torch.float64, "bilinear", "zeros", False, backend=backend, deterministic=deterministic
        )


@pytest.mark.parametrize("backend,device", target_params())
def test_feature_warp_shape(backend, device):
    """FNeVR's hot case, scaled down: a 256-channel channels_last feature map warped by a flow."""
    if backend == "triton" and device == "cpu":
        pytest.skip("too big for the interpreter; test_matches_pytorch covers its channels_last tiles")
    x, grid = make_inputs(2, 256, 16, 16, 16, 16, torch.float32, device, "channels_last", spread=1.1)
    check_against_torch(x, grid, torch.float32, "bilinear", "zeros", False, backend=backend)


BAD_INPUTS = [
    (lambda x, g: (x[0], g), ValueError, r"input must be 4-D \[N, C, H, W\], got shape \(3, 4, 5\)"),
    (lambda x, g: (x, g[..., :1]), ValueError, r"grid must be \[N, Ho, Wo, 2\], got shape \(2, 3, 3, 1\)"),
    (lambda x, g: (x, g[0]), ValueError, r"grid must be \[N, Ho, Wo, 2\]"),
    (lambda x, g: (x, g[:1]), ValueError, "same batch size N, got 1 and 2"),
    (lambda x, g: (x[:, :, :0], g), ValueError, "non-empty spatial dims"),
    (lambda x, g: (x, g.double()), ValueError, "same dtype"),
    (lambda x, g: (x.long(), g), ValueError, "input must be float16"),
    (lambda x, g: (x, g.to("meta")), ValueError, "same device"),
    (lambda x, g: (x.tolist(), g), TypeError, "input must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_tensors(make, error, match):
    x, grid = make_inputs(2, 3, 4, 5, 3, 3, torch.float32)
    with pytest.raises(error, match=match):
        grid_sample(*make(x, grid))


@pytest.mark.parametrize(
    "backend, device", target_params([("reference", "cpu"), ("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
)
def test_autocast_promotes_mixed_dtypes_like_pytorch(backend, device):
    """Under autocast, bf16 features sampled by an fp32 flow run in fp32, as F.grid_sample does;
    outside autocast the same call is an error (test_bad_tensors)."""
    x, grid = make_inputs(2, 3, 4, 5, 3, 3, torch.float32)
    x, grid = x.to(device, torch.bfloat16), grid.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = grid_sample(x, grid, backend=backend)
        want = F.grid_sample(x, grid, align_corners=False)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want.double(), torch.float32, "autocast output")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mode="bicubic"), ValueError, r"mode must be one of \('bilinear', 'nearest'\), got 'bicubic'"),
        (dict(padding_mode="wrap"), ValueError, "padding_mode must be one of"),
        (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run on cpu tensors"),
    ],
)
def test_bad_options(kwargs, error, match):
    x, grid = make_inputs(2, 3, 4, 5, 3, 3, torch.float32)
    with pytest.raises(error, match=match):
        grid_sample(x, grid, **kwargs)


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="CPU extension not built")
def test_kernel_entry_points_check_their_input():
    proc = run_python("""
        import torch, fnevr
        x, grid = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 3, 2)
        for args, message in (((x, grid[:1], 0, 0, False), "grid must be [N, Ho, Wo, 2]"),
                              ((x, grid, 2, 0, False), "mode must be"),
                              ((x, grid, 0, 3, False), "padding must be"),
                              ((x, grid.double(), 0, 0, False), "one dtype")):
            try:
                torch.ops.fnevr._grid_sample_forward(*args)
            except RuntimeError as err:
                assert message in str(err), err
            else:
                raise AssertionError(f"no error for {message}")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("backend,device", target_params())
def test_deterministic_backward_of_non_finite_grad_out_is_nan_not_garbage(backend, device):
    x, grid = make_inputs(1, 2, 4, 4, 3, 3, torch.float32, device, spread=0.5)
    grad_out = torch.ones(1, 2, 3, 3, device=device)
    grad_out[0, 0, 1, 1] = float("inf")
    a = x.clone().requires_grad_()
    grid_sample(a, grid, backend=backend, deterministic=True).backward(grad_out)
    # Fixed point cannot hold inf: the CUDA and Triton scatters give NaN; the CPU's float sums give
    # inf where that point reads. Either way the non-finite gradient must not come out finite.
    assert not a.grad[0, 0].isfinite().all()


@pytest.mark.parametrize("backend,device", target_params())
def test_fast_path_double_backward_matches_the_custom_ops(backend, device, monkeypatch):
    """Second derivatives (through the fused kernels and through the reference) are bit-identical
    whether the eager fast path or the custom ops run (tests/test_op_contract.py checks the first)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64).to(device)
    grid0 = (torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(device)

    def grads():
        x, grid = x0.clone().requires_grad_(), grid0.clone().requires_grad_()
        out = grid_sample(x, grid, padding_mode="border", backend=backend)
        first = torch.autograd.grad(out.square().sum(), (x, grid), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), (x, grid))

    fast = grads()
    monkeypatch.setattr(_fused, "_plain_eager", lambda tensors: False)
    for a, b in zip(fast, grads(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def threads():
    """Calling it sets torch's CPU thread count for the rest of the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="CPU extension not built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("warp", ["smooth", "random"])
@pytest.mark.parametrize("C", [3, 16])
def test_cpu_backward_splits_images_between_threads(threads, layout, warp, C):
    """The CPU backward gives each of an image's threads a band of output points, scattering into a
    private slice of rows then added in band order: every thread count matches PyTorch's op, and
    each is bit-identical run to run."""
    N, H, W, Ho, Wo = 1, 96, 80, 128, 128  # 3 x 128^2: enough work for a band per thread up to 3
    x, grid = make_inputs(N, C, H, W, Ho, Wo, layout=layout, spread=1.2)
    if warp == "smooth":  # bands touch a slice of the rows each
        base = F.affine_grid(torch.eye(2, 3, dtype=torch.float64).expand(N, 2, 3), (N, 1, Ho, Wo), False)
        grid = base * 1.1 + 0.05 * grid
    grad_out = torch.randn(N, C, Ho, Wo, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = torch_reference(x, grid, grad_out, "bilinear", "border", False)
    for n in (1, 2, 3, 4):
        threads(n)
        got = run_op(x, grid, grad_out, "bilinear", "border", False, backend="cpu")
        for name, a, b in zip(("output", "grad input", "grad grid"), got, want):
            assert_close(a, b, torch.float64, f"{name} at {n} threads")
        again = run_op(x, grid, grad_out, "bilinear", "border", False, backend="cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, again)), f"not deterministic at {n} threads"


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="CPU extension not built")
def test_auto_runs_pytorchs_op_where_it_is_faster(threads, monkeypatch):
    """auto on the CPU runs PyTorch's op under no_grad on few-channel NCHW images with at least as
    many images as threads and a finite grid, ours otherwise; backends() says so."""
    calls = []
    module = sys.modules["fnevr.ops.grid_sample"]  # (fnevr.ops.grid_sample is the function)
    pytorch_op = module.TORCH_GRID_SAMPLE
    monkeypatch.setattr(module, "TORCH_GRID_SAMPLE", lambda *a, **k: calls.append(1) or pytorch_op(*a, **k))
    x, grid = make_inputs(2, 3, 9, 8, 7, 6, dtype=torch.float32, spread=1.2)

    def runs_pytorch(x, grid, n):
        threads(n)
        calls.clear()
        with torch.no_grad():
            out = grid_sample(x, grid, "bilinear", "zeros", backend="auto")
        assert_close(out, grid_sample_reference(x.double(), grid.double()), torch.float32, "output")
        return bool(calls)

    assert runs_pytorch(x, grid, 1) and runs_pytorch(x, grid, 2)
    assert not runs_pytorch(x, grid, 3), "fewer images than threads: ours"
    assert not runs_pytorch(x.to(memory_format=torch.channels_last), grid, 1), "channels_last: ours"
    assert not runs_pytorch(x.repeat(1, 2, 1, 1), grid, 1), "more channels: ours"
    for where in ((0, 0, 0, 0), (1, 6, 5, 1)):  # the first and the last coordinate
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = grid.clone()
            bad[where] = value
            assert not runs_pytorch(x, bad, 1), f"grid with {value} at {where}: ours"
    assert runs_pytorch(x, grid.requires_grad_(), 1), "requires_grad under no_grad: PyTorch's"
    grid.requires_grad_(False)
    threads(1)
    calls.clear()
    grid_sample(x, grid, backend="auto")
    assert not calls, "grad mode on (training): ours"
    assert "PyTorch's op under torch.no_grad() for NCHW" in fnevr.ops.backends("cpu", "grid_sample")["auto"]
    assert fnevr.ops.backends("cpu", "composite")["auto"] == "cpu"
    threads(1)
    calls.clear()
    grid_sample(x, grid, backend="cpu")
    assert not calls, "a forced backend is never swapped"
