"""benchmarks/gpu_check.sh, the device check: its dry run walks every stage on the CPU (so the GPU
machine is never the first place it runs), and its summary reads results as it should."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fnevr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary  # noqa: E402

STAGES = {"env", "build", "tests", "warm", "bench", "model", "summary"}
BENCHES = {"copy", *fnevr.ops.ops(), "overhead", "model", "train"}


def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "FNEVR_GPU_CACHE": str(tmp_path / "cache"),
        "PYTHON": sys.executable,
        "FNEVR_COMMIT": "test",
    }
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:])
    (stages_file,) = out.glob("gpu-stages-*-test-dry.txt")
    stamp = stages_file.name[len("gpu-stages-") : -len(".txt")]
    statuses = dict(line.split(" ", 1) for line in stages_file.read_text().splitlines())
    assert set(statuses) == STAGES and all(s.startswith("ok ") for s in statuses.values()), statuses
    assert len(list(out.iterdir())) <= 8  # the device machine returns at most 8 files
    for name in ("env.txt", "tests.txt", "bench.jsonl", "summary.txt", "summary.json", "check.log"):
        assert (out / f"gpu-{name.replace('.', f'-{stamp}.', 1)}").stat().st_size > 0, name
    assert "covered by the selection: 32/32" in proc.stdout

    rows = gpu_summary.load_rows(out / f"gpu-bench-{stamp}.jsonl")
    assert {r["bench"] for r in rows} == BENCHES
    assert not [r for r in rows if "error" in r]
    assert "--- warm train float32" in (tmp_path / "cache" / f"warm-{stamp}.txt").read_text()

    # One line per target, each computed from the dry run's rows and test listing.
    summary = json.loads((out / f"gpu-summary-{stamp}.json").read_text())
    expected = gpu_summary.target_lines(gpu_summary.Rows([]), {}, quick=False, auto_order={})
    assert [t["name"] for t in summary["targets"]] == [x.name for x in expected]
    assert all(x.status == "not measured" for x in expected)
    assert {t["status"] for t in summary["targets"]} == {"dry run"}
    text = (out / f"gpu-summary-{stamp}.txt").read_text()
    assert all(x.name in text for x in expected) and text in proc.stdout


def _row(bench, case, provider, mode, dtype, wall, **more):
    return dict(
        bench=bench,
        case=case,
        provider=provider,
        mode=mode,
        dtype=dtype,
        wall_us=wall,
        host_us=wall,
        kernel_us=wall,
        **more,
    )


@pytest.mark.parametrize("pct, fast_wall, status", [(90, 50, "met"), (60, 90, "NOT MET")])
def test_summary_judges_targets(pct, fast_wall, status):
    rows = [
        _row("composite", "4x64x64x8x256", "triton", "forward", "float32", 10, copy_pct=pct),
        _row("composite", "4x64x64x8x256", "cuda", "forward", "float32", 12, copy_pct=pct - 5),
        _row("composite", "4x64x64x8x256", "triton", "fwd+bwd", "float32", fast_wall),
        _row("composite", "4x64x64x8x256", "compiled-reference", "fwd+bwd", "float32", 100),
    ]
    lines = {x.name: x for x in gpu_summary.target_lines(gpu_summary.Rows(rows), {}, quick=False, auto_order={})}
    forward = lines["composite forward, float32: % of copy bandwidth (kernel time)"]
    assert (forward.status, forward.measured) == (status, f"{pct}% (triton)")
    speedup = lines["composite fwd+bwd, float32: x torch.compile(reference)"]
    assert speedup.status == status and speedup.measured.startswith(f"{100 / fast_wall:.2f}x")
    assert lines["composite backward, float32: % of copy bandwidth (kernel time)"].status == "not measured"


def test_test_log_parsing_and_coverage(tmp_path):
    log = tmp_path / "tests.txt"
    log.write_text(
        "[gw0] [ 10%] PASSED tests/test_composite.py::test_dtypes[(2, 3, 5)-8-256-exclusive-torch.float16-cuda-cuda]\n"
        "[gw1] [ 20%] FAILED tests/test_composite.py::test_dtypes[(7,)-13-3-inclusive-torch.float16-triton-cuda]\n"
        "tests/test_grid_sample.py::test_dtypes[contiguous-torch.bfloat16-cuda-cuda] SKIPPED (no CUDA) [ 30%]\n"
        "FAILED tests/test_composite.py::test_dtypes[(7,)-13-3-inclusive-torch.float16-triton-cuda] - assert 1 == 2\n"
    )
    outcomes = gpu_summary.parse_tests(log)
    assert sorted(outcomes.values()) == ["FAILED", "PASSED", "SKIPPED"]
    cov = gpu_summary.coverage(outcomes, ("float16",))
    assert cov[("composite", "cuda", "float16")] == "PASSED"
    assert cov[("composite", "triton", "float16")] == "FAILED"
    assert cov[("grid_sample", "cuda", "float16")] is None
    line = gpu_summary.test_lines(outcomes, quick=True)[1]  # float16
    assert (line.measured, line.status) == ("1 passed, 1 failed", "NOT MET")
