"""The contract every registered fused op keeps, on every backend that runs here (parametrised over
fnevr/ops/_registry.py, with each op's own sample calls): outputs and gradients match the fp64
reference; one input's gradient alone; backward saves the inputs and small statistics only;
torch.library's opcheck; torch.compile with fullgraph; the eager fast path (fnevr/ops/_fused.py)
equals the custom ops bit for bit and leaves them to compile, fake tensors and modes; deterministic
runs are bit-identical; bad input gets an error naming the argument. An op's own test file keeps
only what is particular to it."""

import contextlib
import dataclasses
import importlib
import inspect
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fnevr
from fnevr.ops import _fused, _registry
from helpers import assert_close, compile_params, target_params

OPS = _registry.ops()
CASES = [
    pytest.param(op, i, id=f"{op}-{s.label}")
    for op in OPS
    for i, s in enumerate(OPS[op].samples("cpu", torch.float64, torch.Generator().manual_seed(0)))
]
FIRST = [pytest.param(op, 0, id=op) for op in OPS]


def _updates_in_place(op, i) -> bool:  # training batch norm updates its running statistics
    kwargs = OPS[op].samples("cpu", torch.float64, torch.Generator().manual_seed(0))[i].kwargs
    return kwargs.get("training", True) and "running_mean" in kwargs


INFERENCE_CASES = [c for c in CASES if not _updates_in_place(*c.values)]


def _sample(op, i, device, dtype=torch.float64, channels_last=False) -> _registry.Sample:
    sample = OPS[op].samples(device, dtype, torch.Generator().manual_seed(0))[i]
    if channels_last:
        first = sample.args[0].contiguous(memory_format=torch.channels_last)
        sample = dataclasses.replace(sample, args=(first, *sample.args[1:]))
    return sample


def _in_fp64(sample) -> _registry.Sample:
    """`sample` with every tensor in fp64 on the CPU: the reference's input, rounded as the op's was."""

    def up(a):
        if isinstance(a, list):
            return [up(t) for t in a]
        return a.detach().to("cpu", torch.float64) if isinstance(a, torch.Tensor) else a

    return dataclasses.replace(
        sample, args=tuple(up(a) for a in sample.args), kwargs={k: up(v) for k, v in sample.kwargs.items()}
    )


def _leaves(sample, positions):
    """The tensors at `positions` of the sample's arguments (a list argument gives all of its)."""
    out = []
    for i in positions:
        a = sample.args[i]
        out.extend(a if isinstance(a, list) else [a])
    return out


def _call(op, sample, backend):
    """The op's outputs (a tuple) for `sample` on `backend`."""
    out = OPS[op].fn(*sample.args, **sample.kwargs, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def _run(op, sample, backend, wrt, grad=True):
    """(outputs, running statistics if any, gradients of sum(outputs) w.r.t. the inputs at `wrt`)."""
    leaves = [t.requires_grad_() for t in _leaves(sample, wrt)] if grad else []
    if not grad:
        with torch.no_grad():
            outs = _call(op, sample, backend)
    else:
        outs = _call(op, sample, backend)
    stats = [v for k, v in sample.kwargs.items() if k.startswith("running_")]
    if not grad:
        return (*outs, *stats)
    live = [o for o in outs if o.requires_grad]  # the reference's weight_sum may not depend on the codes
    grads = torch.autograd.grad(live, leaves, [torch.ones_like(o) for o in live], allow_unused=True)
    return (*outs, *stats, *grads)


def _assert_identical(got, want):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def _layouts(op):
    return [False, True] if OPS[op].layouts else [False]


# --- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,i", CASES)
def test_matches_the_reference(op, i, dtype, backend, device):
    for channels_last in _layouts(op):
        sample = _sample(op, i, device, dtype, channels_last)
        ref = _in_fp64(sample)
        got = _run(op, sample, backend, sample.wrt)
        want = _run(op, ref, "reference", ref.wrt)
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            if b is None:  # the reference does not depend on that input: the fused op gives zeros or None
                assert a is None or not a.any(), f"output {k}"
                continue
            assert a.dtype == dtype, f"{op} output {k}: dtype {a.dtype}"
            assert_close(a, b, dtype, f"{op} output {k} channels_last={channels_last}", OPS[op].tolerance)


def _backward_into(op, sample, backend, which):
    """Backward of sum(outputs) with only the inputs at `which` requiring grad: their .grad."""
    leaves = [t.requires_grad_() for t in _leaves(sample, (which,))]
    outs = [o for o in _call(op, sample, backend) if o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op,i", CASES)
def test_gradient_for_one_input(op, i, backend, device):
    for which in _sample(op, i, "cpu").wrt:
        sample = _sample(op, i, device, torch.float32)
        ref = _in_fp64(sample)
        got, want = _backward_into(op, sample, backend, which), _backward_into(op, ref, "reference", which)
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, torch.float32, f"{op} input {which}, gradient {k}", OPS[op].tolerance)
        others = [j for j in range(len(sample.args)) if j != which]
        assert all(t.grad is None for t in _leaves(sample, others) if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op,i", CASES)
def test_backward_saves_inputs_and_statistics_only(op, i, backend, device):
    sample = _sample(op, i, device, torch.float32)
    leaves = [t.requires_grad_() for t in _leaves(sample, sample.wrt)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        outs = _call(op, sample, backend)
    assert sum(saved) <= sample.max_saved, saved
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs], inputs=leaves)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op,i", CASES)
def test_deterministic_runs_are_bit_identical(op, i, backend, device):
    with _deterministic():
        first = _run(op, _sample(op, i, device, torch.float32), backend, _sample(op, i, "cpu").wrt)
        second = _run(op, _sample(op, i, device, torch.float32), backend, _sample(op, i, "cpu").wrt)
    _assert_identical(first, second)


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# --- torch.library integration -----------------------------------------------------------------------


def _record_custom_op_calls(monkeypatch):
    """[(name, custom op, args)] of every FusedOp call, each made through its custom op."""
    calls = []
    monkeypatch.setattr(_fused, "_plain_eager", lambda tensors: False)
    for fused in _fused_ops():

        def spy(*args, _op=fused.op, _name=fused.name):
            calls.append((_name, _op, args))
            return _op(*args)

        monkeypatch.setattr(fused, "op", spy)
    return calls


def _detached(a):
    if isinstance(a, list):
        return [t.detach() for t in a]
    return a.detach() if isinstance(a, torch.Tensor) else a


def _fused_ops():
    return [v for op in OPS for v in vars(sys.modules[OPS[op].fn.__module__]).values() if isinstance(v, _fused.FusedOp)]


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op,i", CASES)
def test_opcheck(op, i, dtype, backend, device, monkeypatch):
    calls = _record_custom_op_calls(monkeypatch)
    for channels_last in _layouts(op):
        sample = _sample(op, i, device, dtype, channels_last)
        _run(op, sample, backend, sample.wrt)
    assert calls
    monkeypatch.undo()  # opcheck calls the real custom ops
    for name, custom, args in calls:
        if name.endswith("_grad"):  # called in backward on the saved inputs; the gradients' own
            args = tuple(_detached(a) for a in args)  # gradients are grid_sample's double-backward test's
        torch.library.opcheck(custom, args)


# Inductor compiles each op's first sample only: the others take the same ops, and its compiles are slow.
COMPILE_CASES = [
    pytest.param(*c.values, *p.values, id=f"{c.id}-{p.id}", marks=p.marks)
    for c in CASES
    for p in compile_params()
    if p.values[2] != "inductor" or c.values[1] == 0
]


@pytest.mark.parametrize("op,i,backend,device,compiler", COMPILE_CASES)
def test_torch_compile_fullgraph(op, i, backend, device, compiler):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        sample = _sample(op, i, device, torch.float32)  # fresh running statistics for each

        def loss(*args, _kwargs=sample.kwargs):
            out = OPS[op].fn(*args, **_kwargs, backend=backend)
            return sum(torch.sigmoid(o).square().sum() for o in (out if isinstance(out, tuple) else (out,)))

        leaves = [t.requires_grad_() for t in _leaves(sample, sample.wrt)]
        (torch.compile(loss, fullgraph=True, backend=compiler) if compiled else loss)(*sample.args).backward()
        results.append([t.grad for t in leaves])
    for k, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient {k}")


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op,i", CASES)
def test_fast_path_matches_the_custom_ops_bit_for_bit(op, i, grad, backend, device, monkeypatch):
    for channels_last in _layouts(op):
        fast = _run(op, _sample(op, i, device, channels_last=channels_last), backend, _sample(op, i, "cpu").wrt, grad)
        with monkeypatch.context() as m:
            m.setattr(_fused, "_plain_eager", lambda tensors: False)  # every call through the custom ops
            slow = _run(
                op, _sample(op, i, device, channels_last=channels_last), backend, _sample(op, i, "cpu").wrt, grad
            )
        _assert_identical(fast, slow)


def _spy_on_custom_ops(monkeypatch):
    """Counts calls of every op's custom ops (FusedOp.op) by name."""
    calls = {}
    for fused in _fused_ops():

        def spy(*args, _op=fused.op, _name=fused.name):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args)

        monkeypatch.setattr(fused, "op", spy)
    return calls


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op,i", FIRST)
def test_eager_calls_skip_the_custom_ops(op, i, backend, device, monkeypatch):
    calls = _spy_on_custom_ops(monkeypatch)
    sample = _sample(op, i, device)
    lists = any(isinstance(a, list) for a in sample.args)
    for grad in (False, True):
        if not (grad and lists):  # autograd with a tensor list takes the custom op (see FusedOp)
            _run(op, _sample(op, i, device), backend, sample.wrt, grad)
    assert calls == {}


@pytest.mark.parametrize("op,i", FIRST)
def test_fake_tensors_and_modes_get_the_custom_ops(op, i, monkeypatch):
    calls = _spy_on_custom_ops(monkeypatch)
    sample = _sample(op, i, "cpu")
    with FakeTensorMode() as mode:
        args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else mode.from_tensor(a) for a in sample.args]
        kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}
        out = _call(op, dataclasses.replace(sample, args=tuple(args), kwargs=kwargs), "cpu")
    assert type(out[0]).__name__ == "FakeTensor" and calls, calls


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("op,i", FIRST)
def test_torch_compile_traces_the_custom_ops(op, i, backend, device):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    sample = _sample(op, i, device, torch.float32)
    fn = torch.compile(
        lambda *a: _call(op, dataclasses.replace(sample, args=a), backend)[0].square().sum(),
        fullgraph=True,
        backend=aot_autograd(fw_compiler=capture, bw_compiler=capture),
    )
    for t in _leaves(sample, sample.wrt):
        t.requires_grad_()
    fn(*sample.args).backward()
    targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
    assert len(targets) == 2, targets  # forward and backward
    ours = [{t for t in ts if t.startswith("fnevr.")} for ts in targets]
    assert all(ours) and not any(t.startswith("fnevr._") for ts in ours for t in ts), ours  # no kernel entry points
    assert any(t.endswith("_grad.default") for t in ours[1]), ours


class _Inference(torch.nn.Module):
    """One op call as a module, for torch.export (tensor keyword arguments are constants)."""

    def __init__(self, op, sample, backend):
        super().__init__()
        self.fn, self.kwargs, self.backend = OPS[op].fn, sample.kwargs, backend

    def forward(self, *args):
        return self.fn(*args, **self.kwargs, backend=self.backend)


@pytest.mark.parametrize("backend,device", target_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op,i", INFERENCE_CASES)
def test_export_and_decomposition(op, i, dtype, backend, device):
    """torch.export keeps the op as fnevr:: custom ops; run_decompositions(fnevr.ops.decompositions())
    replaces every one of them with standard ops that compute the reference's result (what an ONNX
    export runs)."""
    sample = _sample(op, i, device, dtype)
    program = torch.export.export(_Inference(op, sample, backend), sample.args)
    fused = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("fnevr.")}
    assert fused, "no fnevr:: op in the exported graph"
    decomposed = program.run_decompositions(fnevr.ops.decompositions())
    left = {str(n.target) for n in decomposed.graph.nodes if str(n.target).startswith("fnevr.")}
    assert not left, f"not decomposed: {left}"
    with torch.no_grad():
        got = decomposed.module()(*sample.args)
        ref = _in_fp64(sample)
        want = _call(op, ref, "reference")
    got = got if isinstance(got, tuple) else (got,)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == dtype, f"{op} output {k}: dtype {a.dtype}"
        assert_close(a, b, dtype, f"{op} output {k}, decomposed", OPS[op].tolerance)


# --- the registry and bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_every_kernel_entry_point_has_one_schema_for_all_backends(op):
    """The Triton module's entry points (named after the op) are the C++ schemas' names, less their
    leading underscore: one set of kernel functions whichever fused backend runs."""
    pytest.importorskip("triton")
    module = importlib.import_module(f"fnevr.kernels.{op}")
    names = {n for n, v in vars(module).items() if n.startswith(op + "_") and callable(v)}
    assert names, f"fnevr.kernels.{op} defines no {op}_* entry points"
    for name in names:
        assert hasattr(torch.ops.fnevr, "_" + name), f"no C++ schema _{name} for Triton's {name}"


@pytest.mark.parametrize("op,i", FIRST)
def test_bad_input_names_the_argument(op, i):
    params = list(inspect.signature(OPS[op].fn).parameters)
    sample = _sample(op, i, "cpu", torch.float32)
    for k, arg in enumerate(sample.args):
        if not isinstance(arg, torch.Tensor):
            continue
        name = params[k]
        for bad, error, what in (
            (arg.tolist(), TypeError, "must be a torch.Tensor"),
            (arg.long(), ValueError, "float16, bfloat16, float32 or float64"),
        ):
            args = list(sample.args)
            args[k] = bad
            with pytest.raises(error, match=f"{name}.*{what}|{what}.*{name}"):
                OPS[op].fn(*args, **sample.kwargs)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        OPS[op].fn(*sample.args, **sample.kwargs, backend="fastest")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu tensors"):
        OPS[op].fn(*sample.args, **sample.kwargs, backend="cuda")


def test_auto_takes_the_first_available_backend_of_each_op():
    for op in OPS:
        for kind in _registry.DEVICE_TYPES:
            order = _registry.auto_order(op, kind)
            assert order[-1] == "reference"
            status = _registry.backends(kind)
            want = next(b for b in order if status[b] == "available")
            assert _registry.resolve("auto", torch.device(kind), op) == want
