"""Deployment beyond PyTorch eager (fnevr/export.py, ``fnevr export``): torch.export with the fused
ops inside, AOTInductor packages, ONNX graphs run by ONNX Runtime; versioned checkpoints and
configs; whether the CUDA kernels were built for the GPU at hand. Each fused op's decomposition is
checked in test_op_contract.py."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import fnevr
from fnevr import _extension, export
from fnevr.checkpoint import CheckpointVersionError, load_checkpoint, save_checkpoint
from fnevr.cli import main
from fnevr.model import FNeVR
from helpers import run_python

FUSED = {"fnevr.grid_sample.default", "fnevr.composite.default", "fnevr.spade_norm_instance.default"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FNeVR("small", training_modules=False).eval()


def _relative_error(got, want) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max())


def test_torch_export_of_the_model_keeps_the_fused_ops(model):
    """torch.export.export(model, (source, driving)): no graph break, the fused ops inside as fnevr::
    custom ops, every output of the dict as eager's."""
    source, driving = torch.rand(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).unbind(0)
    program = torch.export.export(model, (source, driving))
    ops = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert {op for op in ops if op.startswith("fnevr.")} == FUSED
    got, want = program.module()(source, driving), model(source, driving)
    flat_got, spec_got = torch.utils._pytree.tree_flatten(got)
    flat_want, spec_want = torch.utils._pytree.tree_flatten(want)
    assert spec_got == spec_want
    for a, b in zip(flat_got, flat_want, strict=True):
        assert _relative_error(a, b) < 1e-5


def test_aoti_packages_equal_eager(model, tmp_path):
    """Both parts compiled by AOTInductor, loaded by aoti_load_package, at a batch they were not
    traced with (the batch is dynamic); metadata recorded."""
    paths = export.export_aoti(model, tmp_path / "aoti")
    assert sorted(p.name for p in (tmp_path / "aoti").iterdir()) == ["generator.pt2", "kp_detector.pt2"]
    for part, path in paths.items():
        runner = torch._inductor.aoti_load_package(str(path))
        meta = runner.get_metadata()
        assert meta["fnevr_version"] == fnevr.__version__ and json.loads(meta["config"]) == model.config
        inputs = export.example_inputs(model, part, batch=3)
        got = runner(*inputs)
        with torch.no_grad():
            want = export.graph(model, part)(*inputs)
        got, want = (tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in (got, want))
        assert len(got) == len(want) == len(export.output_names(model, part))
        for a, b in zip(got, want):
            assert a.shape == b.shape and _relative_error(a, b) < 1e-4, part


def test_cli_exports_onnx_that_onnxruntime_runs(model, tmp_path, capsys):
    """`fnevr export --onnx`: standard ONNX ops only (GridSample, InstanceNormalization, CumSum for the
    fused ops), the metadata, and ONNX Runtime's outputs within 1e-4 of PyTorch's at batch 1 and 3.
    (onnx and onnxruntime are an optional extra: make installs them; a GPU machine may lack them.)"""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    save_checkpoint(tmp_path / "small.pt", model)
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "small.pt"), "--onnx", str(out), "--opset", "18"]) == 0
    assert capsys.readouterr().out.count("checked with ONNX Runtime") == 2
    for part in export.PARTS:
        graph = onnx.load(out / f"{part}.onnx")
        onnx.checker.check_model(graph)
        assert {op.domain for op in graph.opset_import} <= {"", "ai.onnx"}  # no custom-op domain
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["fnevr_version"] == fnevr.__version__ and meta["fnevr_checkpoint_version"] == "1"
        assert json.loads(meta["config"]) == model.config
        assert [i.name for i in graph.graph.input] == export.input_names(model, part)
        assert [o.name for o in graph.graph.output] == export.output_names(model, part)
        if part == "generator":
            kinds = Counter(n.op_type for n in graph.graph.node)
            assert kinds["GridSample"] == 2 and kinds["InstanceNormalization"] == 8 and kinds["CumSum"] == 1
        for batch in (1, 3):
            inputs = export.example_inputs(model, part, batch=batch)
            assert export.check_onnx(model, part, out / f"{part}.onnx", inputs) < 1e-4

    again = ["export", "--checkpoint", str(tmp_path / "small.pt"), "--onnx", str(out)]
    assert main(again) == 2
    assert "generator.onnx exist; --overwrite replaces" in capsys.readouterr().err


def test_a_wrong_onnx_graph_is_caught_and_not_written(model, tmp_path, monkeypatch):
    """The ONNX Runtime check can fail: with the compositing's decomposition made exclusive, the
    export raises and leaves no generator.onnx behind."""
    pytest.importorskip("onnxruntime")
    op = torch.ops.fnevr.composite.default
    table = export.onnx_decompositions()
    wrong = table[op]
    monkeypatch.setattr(
        export, "onnx_decompositions", lambda: {**table, op: lambda c, d, inclusive, *rest: wrong(c, d, False, *rest)}
    )
    with pytest.raises(RuntimeError, match=r"generator.*prediction differs from PyTorch"):
        export.export_onnx(model, tmp_path)
    assert not (tmp_path / "generator.onnx").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "nothing to write"),
        (["--onnx", "o", "--opset", "15"], "--opset must be at least 16"),
        (["--aoti", "x.txt"], "--aoti x.txt is a file"),
        (["--onnx", "o", "--device", "tpu"], "--device"),
    ],
)
def test_cli_export_usage_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("")
    save_checkpoint(tmp_path / "c.pt", FNeVR("small", training_modules=False))
    assert main(["export", "--checkpoint", "c.pt", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_needs_eval_mode_and_a_valid_opset(model, tmp_path):
    with pytest.raises(ValueError, match="eval mode"):
        export.export_program(FNeVR("small", training_modules=False), "generator")
    with pytest.raises(ValueError, match="opset must be at least 16"):
        export.export_onnx(model, tmp_path, opset=13)
    with pytest.raises(ValueError, match="part must be one of"):
        export.graph(model, "decoder")


# --- versions ----------------------------------------------------------------------------------------


def test_checkpoint_format_version(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", FNeVR("small", training_modules=False))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["version"] == 1 and ckpt["fnevr_version"] == fnevr.__version__
    load_checkpoint(path)
    ckpt.update(version=2, fnevr_version="9.0")
    torch.save(ckpt, path)
    message = r"format version 2 \(written by fnevr 9\.0\).* reads versions up to 1"
    with pytest.raises(CheckpointVersionError, match=message):
        load_checkpoint(path)
    ckpt["version"] = "2"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointVersionError, match="expected an integer"):
        load_checkpoint(path)


def test_config_version():
    config = fnevr.load_config("vox-256")
    assert config["fnevr_config_version"] == 1 == fnevr.load_config("small")["fnevr_config_version"]
    del config["fnevr_config_version"]  # the authors' configs have none: version 1
    fnevr.load_config(config)
    with pytest.raises(ValueError, match=r"config version 2; this fnevr .* reads versions up to 1"):
        fnevr.load_config({**config, "fnevr_config_version": 2})


# --- the CUDA kernels' architectures --------------------------------------------------------------------


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        ("sm_80,sm_90", (8, 0), True),
        ("sm_80,sm_90", (8, 6), True),  # a binary runs on later minor versions of its major one
        ("sm_86", (8, 0), False),
        ("sm_80,sm_90", (10, 0), False),  # not on a later major version
        ("sm_80,sm_90", (7, 5), False),
        ("sm_80,sm_90,compute_90", (12, 0), True),  # PTX: the driver compiles it for later GPUs
        ("sm_100,compute_120", (12, 1), True),
        ("sm_100,compute_120", (9, 0), False),
        ("sm_90a", (9, 0), True),
    ],
)
def test_arch_status(archs, capability, runs):
    ok, why = _extension.arch_status(archs, capability, "GPU X")
    assert ok == runs
    assert (why == "") == runs
    if not runs:
        assert archs.replace(",", ", ") in why and f"compute capability {capability[0]}.{capability[1]}" in why


def test_cuda_status_names_the_gpu_it_cannot_run_on(monkeypatch):
    monkeypatch.setattr(_extension, "cuda", SimpleNamespace(cuda_archs="sm_90"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "RTX 5090")
    ok, why = _extension.cuda_status()
    assert not ok and "none of which runs on RTX 5090 (compute capability 12.0)" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert _extension.cuda_status() == (True, "")


def test_auto_takes_triton_where_the_cuda_kernels_cannot_run():
    """On a GPU the CUDA kernels were not built for, backends() says why and `auto` resolves to
    Triton for every op, instead of a launch failure (simulated: a GPU of compute capability 7.5
    and a module built for sm_90)."""
    result = run_python(
        """
        import sys, types, torch
        torch.cuda.is_available = lambda: True
        torch.cuda.current_device = lambda: 0
        torch.cuda.get_device_capability = lambda d=None: (7, 5)
        torch.cuda.get_device_name = lambda d=None: "Tesla T4"
        sys.modules["fnevr._C_cuda"] = types.SimpleNamespace(cuda_archs="sm_90")
        import fnevr
        from fnevr.ops import _registry
        print(fnevr.ops.backends("cuda")["cuda"])
        print(sorted({_registry.resolve("auto", torch.device("cuda"), op) for op in fnevr.ops.ops()}))
        """
    )
    assert result.returncode == 0, result.stderr
    status, chosen = result.stdout.strip().splitlines()
    assert status.startswith("unavailable: fnevr._C_cuda holds GPU code for sm_90, none of which runs on Tesla T4")
    assert chosen == "['triton']"


@pytest.mark.skipif(_extension.cuda is None, reason=f"fnevr._C_cuda is not built: {_extension.cuda_reason}")
def test_the_built_cuda_module_records_its_architectures():
    """CI builds it (FNEVR_EXPECT_BUILD=cpu,cuda): the GPU code it holds is readable."""
    codes = _extension.cuda.cuda_archs.split(",")
    assert codes and all(c.startswith(("sm_", "compute_")) for c in codes)
    for code in codes:  # each runs on its own architecture
        assert _extension.arch_status(_extension.cuda.cuda_archs, _extension._arch(code)) == (True, "")
