"""fnevr.ops.spade_norm: every fused backend against InstanceNorm2d/BatchNorm2d + arithmetic in fp64,
gradients, running statistics and eval mode, layouts, numerical safety, SyncBatchNorm across two
processes, torch.library integration, bad input."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fnevr
from fnevr.ops import spade_norm
from helpers import assert_close, target_params

ACTIVATIONS = [None, "relu", "leaky_relu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, C, H, W): H W = 1 (instance norm of one pixel), C = 1, odd sizes, one wider than a tile.
SHAPES = [(2, 3, 5, 7), (1, 1, 4, 4), (3, 4, 1, 1), (2, 1, 3, 1), (2, 70, 3, 3), (1, 2, 45, 50)]
MODULATIONS = ["full", "per-sample-channel", "per-channel"]  # gamma/beta [N,C,H,W], [N,C,1,1], [1,C,1,1]
ALL = target_params() + [pytest.param("reference", "cpu", id="reference-cpu")]


def make_inputs(shape, dtype=torch.float32, device="cpu", modulation="full", channels_last=False, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    N, C, _, _ = shape
    mshape = {"full": shape, "per-sample-channel": (N, C, 1, 1), "per-channel": (1, C, 1, 1)}[modulation]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset
    x = x + torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64)  # channels differ in mean
    gamma = torch.randn(mshape, generator=g, dtype=torch.float64) * 0.5
    beta = torch.randn(mshape, generator=g, dtype=torch.float64) * 0.5
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64)
    x, gamma, beta, grad_y = (t.to(device, dtype) for t in (x, gamma, beta, grad_y))
    if channels_last:
        x, grad_y = x.to(memory_format=torch.channels_last), grad_y.to(memory_format=torch.channels_last)
        if modulation == "full":
            gamma, beta = (t.to(memory_format=torch.channels_last) for t in (gamma, beta))
    return x, gamma, beta, grad_y


def expected(
    x,
    gamma,
    beta,
    grad_y,
    norm="instance",
    activation=None,
    slope=0.2,
    training=True,
    stats=None,
    momentum=0.1,
    eps=1e-5,
):
    """PyTorch's modules and arithmetic in fp64 -> (y, dx, dgamma, dbeta, running mean, running var)."""
    x, gamma, beta = (t.detach().cpu().double().requires_grad_() for t in (x, gamma, beta))
    C = x.shape[1]
    if norm == "instance":
        layer = torch.nn.InstanceNorm2d(C, eps=eps, affine=False).double()
    else:
        layer = torch.nn.BatchNorm2d(C, eps=eps, momentum=momentum, affine=False).double()
        if stats is not None:
            layer.running_mean.copy_(stats[0]), layer.running_var.copy_(stats[1])
        layer.train(training)
    # InstanceNorm2d refuses a single pixel; its normalised value is 0 (x minus its own mean).
    xhat = x - x.mean((2, 3), keepdim=True) if norm == "instance" and x[0, 0].numel() == 1 else layer(x)
    z = xhat * (1 + gamma) + beta
    y = {None: lambda t: t, "relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope)}[activation](z)
    y.backward(grad_y.cpu().double())
    run = (layer.running_mean, layer.running_var) if norm == "batch" else (None, None)
    return y, x.grad, gamma.grad, beta.grad, *run


def run_op(x, gamma, beta, grad_y, stats=None, **kw):
    x, gamma, beta = (t.detach().clone().requires_grad_() for t in (x, gamma, beta))
    running = {}
    if stats is not None:
        running = dict(running_mean=stats[0].clone().to(x.device), running_var=stats[1].clone().to(x.device))
    y = spade_norm(x, gamma, beta, **running, **kw)
    y.backward(grad_y)
    return y, x.grad, gamma.grad, beta.grad, running.get("running_mean"), running.get("running_var")


def check(x, gamma, beta, grad_y, dtype, stats=None, **kw):
    got = run_op(x, gamma, beta, grad_y, stats=stats, **kw)
    want_kw = {k: v for k, v in kw.items() if k in ("norm", "activation", "training", "momentum", "eps")}
    if "negative_slope" in kw:
        want_kw["slope"] = kw["negative_slope"]
    want = expected(x, gamma, beta, grad_y, stats=stats, **want_kw)
    for name, a, b in zip(("y", "grad x", "grad gamma", "grad beta", "running mean", "running var"), got, want):
        if b is None:
            continue
        if name[0] in "yg":
            assert a.dtype == x.dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, b, dtype, name)
    assert got[0].is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    )
    return got


def batch_stats(C, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_fp64(backend, device, norm, activation, shape):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    if norm == "batch" and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("batch norm needs more than one value per channel")
    if backend == "triton" and device == "cpu" and shape in SHAPES[3:5]:
        pytest.skip("kept short in the slow interpreter: the other shapes cover the same paths")
    x, gamma, beta, grad_y = make_inputs(shape, torch.float64, device)
    stats = batch_stats(shape[1]) if norm == "batch" else None
    check(
        x,
        gamma,
        beta,
        grad_y,
        torch.float64,
        stats=stats,
        norm=norm,
        activation=activation,
        negative_slope=0.1,
        backend=backend,
    )


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_layouts_and_broadcast_modulation(backend, device, norm, modulation, channels_last):
    x, gamma, beta, grad_y = make_inputs((2, 6, 5, 3), torch.float32, device, modulation, channels_last)
    stats = batch_stats(6) if norm == "batch" else None
    check(x, gamma, beta, grad_y, torch.float32, stats=stats, norm=norm, activation="relu", backend=backend)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("x_channels_last", [False, True], ids=["nchw-x", "channels_last-x"])
def test_full_modulation_in_the_other_layout(backend, device, x_channels_last):
    # Full-size gamma/beta skip the broadcasting views: they must still reach the kernels in x's layout.
    x, gamma, beta, grad_y = make_inputs((2, 6, 5, 3), torch.float32, device, "full", x_channels_last)
    other = torch.contiguous_format if x_channels_last else torch.channels_last
    gamma, beta = (t.contiguous(memory_format=other) for t in (gamma, beta))
    check(x, gamma, beta, grad_y, torch.float32, activation="relu", backend=backend)


@pytest.mark.parametrize("backend,device", [p for p in target_params() if p.values[0] == "triton"])
@pytest.mark.parametrize("modulation", ["full", "per-sample-channel"])
def test_triton_fused_instance_norm_over_several_tiles(backend, device, modulation, monkeypatch):
    from fnevr.kernels import spade_norm as triton_spade

    monkeypatch.setattr(triton_spade, "_ONE_TILE_MAX", 16)  # rows of 35 take three tiles and two passes
    x, gamma, beta, grad_y = make_inputs((2, 3, 5, 7), torch.float64, device, modulation)
    check(x, gamma, beta, grad_y, torch.float64, activation="leaky_relu", backend=backend)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_dtypes(backend, device, dtype, norm):
    if dtype == torch.float64 and device == "cuda" and backend == "triton":
        pass  # Triton supports fp64 on GPUs too
    x, gamma, beta, grad_y = make_inputs((2, 8, 6, 5), dtype, device)
    stats = batch_stats(8) if norm == "batch" else None
    check(x, gamma, beta, grad_y, dtype, stats=stats, norm=norm, activation="leaky_relu", backend=backend)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("modulation", ["full", "per-sample-channel"])
def test_batch_norm_eval_uses_running_stats(backend, device, modulation):
    x, gamma, beta, grad_y = make_inputs((3, 4, 5, 5), torch.float64, device, modulation)
    stats = batch_stats(4)
    got = check(x, gamma, beta, grad_y, torch.float64, stats=stats, norm="batch", training=False, backend=backend)
    assert torch.equal(got[4].cpu(), stats[0]) and torch.equal(got[5].cpu(), stats[1]), "eval must not update"


@pytest.mark.parametrize("backend,device", ALL)
def test_running_stats_accumulate_like_batchnorm(backend, device):
    layer = torch.nn.BatchNorm2d(5, momentum=0.3, affine=False).double()
    rm, rv = torch.zeros(5, dtype=torch.float64, device=device), torch.ones(5, dtype=torch.float64, device=device)
    for seed in range(3):
        x, gamma, beta, _ = make_inputs((2, 5, 3, 4), torch.float64, device, seed=seed)
        spade_norm(x, gamma, beta, norm="batch", running_mean=rm, running_var=rv, momentum=0.3, backend=backend)
        layer(x.cpu())
    assert_close(rm, layer.running_mean, torch.float64, "running mean")
    assert_close(rv, layer.running_var, torch.float64, "running var")


@pytest.mark.parametrize("backend,device", target_params())  # PyTorch's own fp32 norm is not exact here
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_constant_input(backend, device, norm):
    x, gamma, beta, grad_y = make_inputs((2, 3, 4, 4), torch.float32, device)
    x = torch.full_like(x, 3.25)
    y, dx, dgamma, dbeta, *_ = run_op(x, gamma, beta, grad_y, norm=norm, activation="relu", backend=backend)
    want = expected(x, gamma, beta, grad_y, norm=norm, activation="relu")
    assert torch.equal(y, torch.relu(beta)), "a constant input normalises to exactly 0"
    assert torch.equal(dgamma, torch.zeros_like(dgamma)), "dgamma = dz xhat = 0"
    assert want[2].abs().max() < 1e-12
    assert_close(dx, want[1], torch.float32, "grad x")  # rstd = 1/sqrt(eps): large, but finite
    assert_close(dbeta, want[3], torch.float32, "grad beta")


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_empty_batch(backend, device, norm):
    x, gamma, beta, _ = make_inputs((0, 3, 4, 4), device=device)
    beta = torch.randn(1, 3, 1, 1, device=device).requires_grad_()
    running = dict(running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device))
    y = spade_norm(x.requires_grad_(), gamma, beta, norm=norm, backend=backend, **(running if norm == "batch" else {}))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(beta.grad, torch.zeros_like(beta))
    assert torch.equal(running["running_var"], torch.ones(3, device=device)), "nothing to fold in"


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_mean_does_not_cancel(backend, device, norm, channels_last):
    # fp64 around 1e8 with unit spread: E[x^2] - E[x]^2 would lose every digit (1e16 vs 1).
    x, gamma, beta, grad_y = make_inputs((2, 3, 40, 40), torch.float64, device, channels_last=channels_last, offset=1e8)
    y, dx, *_ = run_op(x, gamma, beta, grad_y, norm=norm, backend=backend)
    want = expected(x, gamma, beta, grad_y, norm=norm)
    torch.testing.assert_close(y.cpu(), want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(dx.cpu(), want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_large_mean_fp32_statistics(backend, device, norm):
    # fp32 around 1e4: the naive formula's error (~1e8 * 6e-8 per element) would swamp the variance of ~2.
    x, gamma, beta, grad_y = make_inputs((2, 3, 40, 40), torch.float32, device, offset=1e4)
    y, dx, *_ = run_op(x, gamma, beta, grad_y, norm=norm, backend=backend)
    want = expected(x, gamma, beta, grad_y, norm=norm)
    # x itself is rounded to 1e4 * 2^-24 ~ 6e-4, so its mean can be no better than that.
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=0, atol=4e-3)
    torch.testing.assert_close(dx.double().cpu(), want[1], rtol=0, atol=4e-3)


# --- reductions cut into pieces (channels_last, batch norm: few groups for a GPU) -------------------
# Triton's cut depends on its tile and the multiprocessor count: both are made small here so that
# small shapes are cut into uneven pieces, in the interpreter as on a GPU. CUDA cuts by the device's
# count: the shapes on a GPU are big enough to be cut there.
CUT_SHAPE = (2, 3, 20, 20)


def _cut_shape(shape, device):
    return (2, 3, 70, 70) if device == "cuda" and shape == CUT_SHAPE else shape  # NCHW runs over 4096: cut in CUDA


@pytest.fixture
def small_cuts(monkeypatch):
    """-> fn(backend, shape, channels_last, norm, sms): make Triton cut its reductions of `shape` as on
    a GPU of `sms` multiprocessors, with tiles of 64 elements -> (statistics' _Split, sums' _Split),
    or None for other backends."""

    def setup(backend, shape, channels_last, norm, sms=4):
        if backend != "triton":
            return None
        from fnevr.kernels import spade_norm as k

        monkeypatch.setattr(k, "_REDUCE_TILE", 64)
        monkeypatch.setattr(k, "multiprocessors", lambda device, interpreter: sms)
        N, C, H, W = shape
        block_c, block_s = k._reduce_blocks(C, H * W, channels_last)
        c_tiles = -(-C // block_c)
        return (
            k._split(N, H * W, block_s, c_tiles, torch.device("cpu"), norm == "batch"),
            k._split(N, H * W, block_s, c_tiles, torch.device("cpu"), False),
        )

    return setup


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("modulation", ["full", "per-sample-channel"])
def test_cut_reductions_match_fp64(backend, device, norm, channels_last, modulation, small_cuts):
    shape = _cut_shape(CUT_SHAPE, device)
    cuts = small_cuts(backend, shape, channels_last, norm)
    if cuts is not None:  # the test must see merged pieces: uneven chunks (NCHW instance norm is fused)
        stats, sums = cuts
        S = shape[2] * shape[3]
        assert sums.chunks > 1 and S % sums.chunk != 0, sums
        if norm == "batch" or channels_last:
            assert stats.chunks > 1 and S % stats.chunk != 0, stats
    x, gamma, beta, grad_y = make_inputs(shape, torch.float64, device, modulation, channels_last)
    stats = batch_stats(shape[1]) if norm == "batch" else None
    check(x, gamma, beta, grad_y, torch.float64, stats=stats, norm=norm, activation="leaky_relu", backend=backend)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("channels_last,sms", [(False, 2), (True, 1)], ids=["nchw", "channels_last"])
def test_cut_batch_norm_into_uneven_sample_groups(backend, device, channels_last, sms, small_cuts):
    shape = (5, 4, 9, 11)
    cuts = small_cuts(backend, shape, channels_last, "batch", sms)
    if cuts is not None:
        assert 1 < cuts[0].per_group < 5 and 5 % cuts[0].per_group != 0, cuts[0]
    x, gamma, beta, grad_y = make_inputs(shape, torch.float64, device, "per-sample-channel", channels_last)
    check(x, gamma, beta, grad_y, torch.float64, stats=batch_stats(4), norm="batch", activation="relu", backend=backend)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,offset,atol", [(torch.float64, 1e8, 1e-6), (torch.float32, 1e4, 4e-3)], ids=str)
def test_cut_reductions_large_mean(backend, device, norm, channels_last, dtype, offset, atol, small_cuts):
    # Partials merged by Chan's rule: no E[x^2] - E[x]^2 between pieces either (see the tests above).
    shape = _cut_shape(CUT_SHAPE, device)
    small_cuts(backend, shape, channels_last, norm)
    x, gamma, beta, grad_y = make_inputs(shape, dtype, device, channels_last=channels_last, offset=offset)
    y, dx, *_ = run_op(x, gamma, beta, grad_y, norm=norm, backend=backend)
    want = expected(x, gamma, beta, grad_y, norm=norm)
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=0, atol=atol)
    torch.testing.assert_close(dx.double().cpu(), want[1], rtol=0, atol=atol)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
def test_non_finite_input_spoils_its_group_only(backend, device, norm, channels_last, bad, small_cuts):
    # As PyTorch's norms: a NaN or inf makes its group's statistics, outputs and gradients NaN, and no
    # other group's (nor does a merge of pieces carry it over).
    shape = _cut_shape(CUT_SHAPE, device)
    small_cuts(backend, shape, channels_last, norm)
    x, gamma, beta, grad_y = make_inputs(shape, torch.float64, device, channels_last=channels_last)
    x[1, 2, 5, 7] = bad
    stats = batch_stats(shape[1]) if norm == "batch" else None
    y, dx, *_ = check(x, gamma, beta, grad_y, torch.float64, stats=stats, norm=norm, activation="relu", backend=backend)
    spoilt = torch.zeros(shape, dtype=torch.bool)
    spoilt[(slice(None) if norm == "batch" else 1), 2] = True
    assert torch.equal(y.isnan().cpu(), spoilt) and torch.equal(dx.isnan().cpu(), spoilt)


@pytest.mark.parametrize("backend,device", [p for p in target_params() if p.values[1] == "cuda"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cut_reductions_are_deterministic(backend, device, norm, channels_last):
    # Partials are merged in a fixed order (no atomics): the same input gives the same bits.
    x, gamma, beta, grad_y = make_inputs((4, 32, 128, 128), torch.float32, device, channels_last=channels_last)
    runs = [run_op(x, gamma, beta, grad_y, norm=norm, activation="relu", backend=backend)[:4] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


GRADCHECK_MODES = [
    ("instance", "full"),
    ("instance", "per-channel"),
    ("batch", "full"),
    ("batch", "per-sample-channel"),
]


@pytest.mark.parametrize(
    "backend,norm,modulation",
    [(b, *m) for b in ("reference", "cpu") for m in GRADCHECK_MODES] + [("triton", *m) for m in GRADCHECK_MODES[::3]],
)  # the interpreter is slow
def test_gradcheck_fp64(backend, norm, modulation):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    x, gamma, beta, _ = make_inputs((2, 3, 3, 2), torch.float64, modulation=modulation)
    fn = lambda x, g, b: spade_norm(x, g, b, norm=norm, activation="leaky_relu", backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, gamma, beta)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, backends, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, gamma, beta, grad_y = make_inputs((5, 3, 4, 3), torch.float64)
        rows = slice(0, 2) if rank == 0 else slice(2, 5)  # uneven halves of the batch
        out = {}
        for backend in backends:
            stats = [t.clone() for t in batch_stats(3)]
            xs, gs, bs = (t[rows].clone().requires_grad_() for t in (x, gamma, beta))
            y = spade_norm(
                xs,
                gs,
                bs,
                norm="batch",
                activation="leaky_relu",
                running_mean=stats[0],
                running_var=stats[1],
                process_group=dist.group.WORLD,
                backend=backend,
            )
            y.backward(grad_y[rows])
            out[backend] = [t.detach() for t in (y, xs.grad, gs.grad, bs.grad, *stats)]
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_matches_one_process_on_the_whole_batch():
    import torch.multiprocessing as mp

    backends = [b for b in ("reference", "cpu", "triton") if fnevr.ops.backends("cpu")[b] == "available"]
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(2, _free_port(), backends, results), nprocs=2, join=True)
    x, gamma, beta, grad_y = make_inputs((5, 3, 4, 3), torch.float64)
    want = expected(x, gamma, beta, grad_y, norm="batch", activation="leaky_relu", stats=batch_stats(3))
    for backend in backends:
        per_rank = [results[r][backend] for r in range(2)]
        for i, name in enumerate(("y", "grad x", "grad gamma", "grad beta")):
            assert_close(torch.cat([per_rank[0][i], per_rank[1][i]]), want[i], torch.float64, f"{backend} {name}")
        for r in range(2):
            assert_close(per_rank[r][4], want[4], torch.float64, f"{backend} running mean, rank {r}")
            assert_close(per_rank[r][5], want[5], torch.float64, f"{backend} running var, rank {r}")


# --- bad input ---------------------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda x, g, b: (x[0], g[0], b[0]), ValueError, r"x must be \[N, C, H, W\]"),
    (lambda x, g, b: (x, g[:, :2], b), ValueError, r"gamma must be \[N, C, H, W\] = \[2, 3, 4, 5\] or broadcastable"),
    (lambda x, g, b: (x, g, b[..., :4]), ValueError, "beta must be"),
    (lambda x, g, b: (x, g.double(), b), ValueError, "gamma must have x's dtype"),
    (lambda x, g, b: (x.long(), g, b), ValueError, "x must be float16"),
    (lambda x, g, b: (x, g, b.to("meta")), ValueError, "beta must be on x's device"),
    (lambda x, g, b: (x.tolist(), g, b), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_tensors(make, error, match):
    x, gamma, beta, _ = make_inputs((2, 3, 4, 5))
    with pytest.raises(error, match=match):
        spade_norm(*make(x, gamma, beta))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(norm="group"), ValueError, "norm must be one of"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run on cpu tensors"),
        (dict(norm="batch", training=False), ValueError, "training=False needs running_mean and running_var"),
        (dict(norm="batch", running_mean=torch.zeros(3)), ValueError, "must be given together"),
        (
            dict(norm="batch", running_mean=torch.zeros(4), running_var=torch.ones(4)),
            ValueError,
            r"running_mean must be a floating \[C\] = \[3\]",
        ),
        (dict(running_mean=torch.zeros(3), running_var=torch.ones(3)), ValueError, "norm='batch' only"),
        (dict(norm="batch", momentum=2.0), ValueError, "momentum must be"),
        (dict(process_group=object()), ValueError, "process_group applies to norm='batch' only"),
    ],
)
def test_bad_options(kwargs, error, match):
    x, gamma, beta, _ = make_inputs((2, 3, 4, 5))
    with pytest.raises(error, match=match):
        spade_norm(x, gamma, beta, **kwargs)


def test_batch_norm_of_one_value_per_channel_is_refused():
    x, gamma, beta, _ = make_inputs((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than one value per channel"):
        spade_norm(x, gamma, beta, norm="batch")


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="CPU extension not built")
def test_kernel_entry_points_check_their_input():
    # In a subprocess, as in test_composite: an exception thrown by the extension must not end the run.
    code = """
        import torch, fnevr
        x = torch.randn(2, 3, 8)
        mean, var = torch.ops.fnevr._spade_norm_stats(x, False, False)
        for args, message in (((x, x[:, :2], x, mean, var, 1e-5, False, 0, 0.2), "gamma and beta must be"),
                              ((x, x, x, mean[:1], var, 1e-5, False, 0, 0.2), "mean and var must be"),
                              ((x, x, x, mean, var, 1e-5, False, 5, 0.2), "activation must be")):
            try:
                torch.ops.fnevr._spade_norm_forward(*args)
            except RuntimeError as err:
                assert message in str(err), err
            else:
                raise AssertionError(f"no error for {message}")
        print("ok")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
