"""Every Triton kernel of every op compiles for sm_90 (an H100), with no GPU.

The interpreter that runs the Triton tests on the CPU never runs Triton's code generator, so a kernel
can pass all of them and still fail to compile for a GPU. Here each op's launch code runs in
compile-only mode (``FNEVR_TRITON_COMPILE_ONLY=90``, :mod:`fnevr.kernels.aot`) on the shapes of
each op's ``compile_launches`` (kernels/<op>.py), which select every tile, warp count and autotuner
config the launch code can pick, in fp32, fp16 and bf16, forward and backward. A kernel that does
not compile, or that needs more shared memory than an H100 gives a block (227 KB), fails the test;
registers and spills (the stack frame) are printed (``pytest -rP``; ``.ci/run`` prints the whole
report).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fnevr

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

OPS = tuple(fnevr.ops.ops())
DTYPES = ("fp32", "fp16", "bf16")
MAX_SHARED = 232448  # bytes of shared memory a block may have on sm_90
KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """One compile-only process per op, all started at once; {op: (process, report path)}."""
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FNEVR_TRITON_COMPILE_ONLY"] = "90"
    procs = {
        op: (
            subprocess.Popen(
                [sys.executable, "-m", "fnevr.kernels", op, "--json", str(out / f"{op}.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            out / f"{op}.json",
        )
        for op in OPS
    }
    yield procs
    for proc, _ in procs.values():
        proc.kill()


def _launched_kernels(op: str) -> set[str]:
    """Names of the @triton.jit functions of kernels/<op>.py that its wrappers launch (`_*_kernel`)."""
    return set(re.findall(r"^@triton\.jit\ndef (_\w+_kernel)\(", (KERNELS_DIR / f"{op}.py").read_text(), re.M))


@pytest.mark.parametrize("op", OPS)
def test_every_kernel_compiles_for_sm90(compiles, op):
    proc, path = compiles[op]
    stdout, stderr = proc.communicate(timeout=1800)
    print(stdout)
    assert proc.returncode == 0, f"{op} failed to compile for sm_90:\n{stderr[-6000:]}"
    report = json.loads(path.read_text())[op]
    for name in _launched_kernels(op):
        variants = [k for k in report if k["name"] == name]
        assert variants, f"{op}: {name} was never compiled: add a case to compile_launches in kernels/{op}.py"
        if all(set(k["pointers"]) == {"fp32"} for k in variants):
            continue  # fp32 workspaces only (merges of partial results): the same kernel for every dtype
        for dtype in DTYPES:
            assert any(dtype in k["pointers"] for k in variants), (
                f"{op}: {name} was never compiled with {dtype} tensors: "
                f"add a case to compile_launches in kernels/{op}.py"
            )
    too_big = [(k["name"], k["shared"], k["constants"]) for k in report if k["shared"] > MAX_SHARED]
    assert not too_big, f"{op}: kernels need more than {MAX_SHARED} B of shared memory on sm_90: {too_big}"
