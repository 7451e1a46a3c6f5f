"""The ops' eager fast path (fnevr/ops/_backend.py, FusedOp): in plain eager mode the ops skip their
torch.library custom ops. It must give bit-identical outputs and gradients to the custom-op path,
be what runs in eager mode, and leave the custom ops to torch.compile, fake tensors and modes."""

import sys

import pytest
import torch
from helpers import target_params
from torch._subclasses.fake_tensor import FakeTensorMode

from fnevr.ops import _backend, composite, grid_sample, spade_norm

OPS = {name: sys.modules[f"fnevr.ops.{name}"] for name in ("composite", "grid_sample", "spade_norm")}


def _inputs(op, device, dtype=torch.float64, channels_last=False):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    if op == "composite":
        return [t(2, 3, 5, 4), t(2, 3, 5, 1) * 2 - 0.5]
    if op == "grid_sample":
        x, grid = t(2, 3, 5, 6), t(2, 4, 3, 2) * 2.4 - 1.2
    else:
        x, grid = t(2, 3, 4, 5), t(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, grid] if op == "grid_sample" else [x, grid, t(2, 3, 1, 1)]


# (op, keyword arguments, which inputs require grad): the paths each op's forward and backward take.
CASES = [
    ("composite", dict(transmittance="inclusive"), (0, 1)),
    ("composite", dict(transmittance="exclusive", density_activation="softplus"), (1,)),
    ("grid_sample", dict(padding_mode="border", align_corners=True), (0, 1)),
    ("grid_sample", dict(mode="nearest", padding_mode="reflection"), (0,)),
    ("grid_sample", dict(deterministic=True), (1,)),
    ("spade_norm", dict(activation="leaky_relu"), (0, 1, 2)),
    ("spade_norm", dict(norm="batch", activation="relu"), (0, 2)),
    ("spade_norm", dict(norm="batch", training=False), (1,)),
]


def _call(op, args, kwargs, backend):
    kwargs = dict(kwargs, backend=backend)
    if op == "spade_norm" and kwargs.get("norm") == "batch":
        kwargs.update(running_mean=torch.zeros(3, dtype=args[0].dtype, device=args[0].device),
                      running_var=torch.ones(3, dtype=args[0].dtype, device=args[0].device))
    fn = {"composite": composite, "grid_sample": grid_sample, "spade_norm": spade_norm}[op]
    out = fn(*args, **kwargs)
    return out, kwargs.get("running_mean"), kwargs.get("running_var")


def _run(op, kwargs, wrt, backend, device, channels_last, grad):
    args = [a.requires_grad_(grad and i in wrt) for i, a in enumerate(_inputs(op, device, channels_last=channels_last))]
    if not grad:
        with torch.no_grad():
            return _call(op, args, kwargs, backend)
    out, *stats = _call(op, args, kwargs, backend)
    grads = torch.autograd.grad(out, [args[i] for i in wrt], torch.ones_like(out))
    return (out, *stats, *grads)


def _assert_identical(got, want):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op,kwargs,wrt", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fast_path_matches_the_custom_ops_bit_for_bit(op, kwargs, wrt, grad, channels_last, backend, device,
                                                      monkeypatch):
    if channels_last and op == "composite":
        pytest.skip("composite has no memory formats")
    fast = _run(op, kwargs, wrt, backend, device, channels_last, grad)
    monkeypatch.setattr(_backend, "_plain_eager", lambda tensors: False)  # every call through the custom ops
    slow = _run(op, kwargs, wrt, backend, device, channels_last, grad)
    _assert_identical(fast, slow)


@pytest.mark.parametrize("backend,device", target_params())
def test_fast_path_double_backward_matches(backend, device, monkeypatch):
    def grads():  # grid_sample: second derivatives through the fused kernels and through the reference
        x, grid = (a.requires_grad_() for a in _inputs("grid_sample", device))
        out = grid_sample(x, grid, padding_mode="border", backend=backend)
        first = torch.autograd.grad(out.square().sum(), (x, grid), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), (x, grid))

    fast = grads()
    monkeypatch.setattr(_backend, "_plain_eager", lambda tensors: False)
    _assert_identical(fast, grads())


def _spy_on_custom_ops(monkeypatch):
    """Counts calls of every op's custom ops (FusedOp.op) by name."""
    calls = {}
    for module in OPS.values():
        for fused in vars(module).values():
            if isinstance(fused, _backend.FusedOp):
                def spy(*args, _op=fused.op, _name=fused._name):
                    calls[_name] = calls.get(_name, 0) + 1
                    return _op(*args)
                monkeypatch.setattr(fused, "op", spy)
    return calls


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op", list(OPS))
def test_eager_calls_skip_the_custom_ops(op, backend, device, monkeypatch):
    calls = _spy_on_custom_ops(monkeypatch)
    for grad in (False, True):
        _run(op, {}, (0, 1), backend, device, False, grad)
    assert calls == {}


@pytest.mark.parametrize("op", list(OPS))
def test_fake_tensors_and_modes_get_the_custom_ops(op, monkeypatch):
    calls = _spy_on_custom_ops(monkeypatch)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) for a in _inputs(op, "cpu")]
        out, *_ = _call(op, args, {}, "cpu")
    assert type(out).__name__ == "FakeTensor" and calls, calls


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op", list(OPS))
def test_torch_compile_traces_the_custom_ops(op, backend, device):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    fn = torch.compile(lambda *a: _call(op, list(a), {}, backend)[0].square().sum(), fullgraph=True,
                       backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    args = [a.requires_grad_() for a in _inputs(op, device, torch.float32)]
    fn(*args).backward()
    targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
    assert len(targets) == 2, targets  # forward and backward
    ours = [{t for t in ts if t.startswith("fnevr.")} for ts in targets]
    assert all(ours) and not any(t.startswith("fnevr._") for ts in ours for t in ts), ours  # no kernel entry points
    assert any(t.endswith("_grad.default") for t in ours[1]), ours
