"""The compiled extensions (fnevr._C, fnevr._C_cuda): an error raised inside them reaches Python as
an exception with its whole message, and they use the process's shared C++ runtime.

A module that carries its own copy of libstdc++ (linked from libstdc++.a, or with
-static-libstdc++) mixes two copies of iostreams and locales: formatting a number in a TORCH_CHECK
message then loses the rest of the message (seen here with g++ 12) or crashes the process (the H100
machine, g++ 13 under a newer libstdc++). setup.py links libstdc++.so.6 by name to prevent it.
"""

import importlib.util
import shutil
import subprocess

import pytest

import fnevr
from helpers import run_python

# Each kernel entry point called with a bad argument, and the whole message its TORCH_CHECK builds
# (numbers included: formatting them is what failed).
BAD_CALLS = """
import torch, fnevr
ops, dev = torch.ops.fnevr, "{device}"
x, params = torch.rand(2, 3, 4, 5, device=dev), [torch.rand(1, device=dev)] * 14
calls = [
    (lambda: ops._composite_forward(torch.rand(4, 8, 4, device=dev), torch.randn(4, 3, device=dev), False, 0),
     "fnevr composite: density must be [R, D] = [4, 8], got [4, 3]"),
    (lambda: ops._composite_forward(torch.rand(4, 8, 4, device=dev), torch.randn(4, 8, device=dev), False, 7),
     "fnevr composite: activation must be 0 (none), 1 (relu) or 3 (softplus), got 7"),
    (lambda: ops._grid_sample_forward(x, torch.rand(2, 6, 7, 3, device=dev), 0, 0, False),
     "fnevr grid_sample: grid must be [N, Ho, Wo, 2] with N = 2, got [2, 6, 7, 3]"),
    (lambda: ops._spade_norm_stats(torch.rand(2, 3, device=dev), False, False),
     "fnevr spade_norm: x must be a contiguous [N, C, S] or [N, S, C] tensor, got sizes [2, 3]"),
    (lambda: ops._mlp_composite_forward(torch.rand(4, 8, 16, device=dev), torch.rand(4, 7, 16, device=dev), params,
                                        True, 0),
     "fnevr mlp_composite: color_code and shape_code must be [R, D, Ec] and [R, D, Es], got [4, 8, 16] and [4, 7, 16]"),
]
for call, message in calls:
    try:
        call()
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        assert first == message, f"got {{first!r}}, expected {{message!r}}"
    else:
        raise AssertionError(f"no error for {{message!r}}")
print("ok")
"""


def _module_file(name: str) -> str | None:
    spec = importlib.util.find_spec(f"fnevr.{name}")
    return spec.origin if spec else None


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="CPU extension not built")
def test_cpu_kernel_errors_reach_python_whole():
    # In a subprocess: a crash must fail this test, not end the run.
    proc = run_python(BAD_CALLS.format(device="cpu"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.skipif(fnevr.ops.backends("cuda")["cuda"] != "available", reason="no CUDA device or extension")
def test_cuda_kernel_errors_reach_python_whole():
    proc = run_python(BAD_CALLS.format(device="cuda"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
@pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs binutils (nm, readelf)"
)
def test_extension_links_the_shared_cxx_runtime(name):
    path = _module_file(name)
    if path is None:
        pytest.skip(f"fnevr.{name} was not built")
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in needed, f"{path} does not load libstdc++.so.6:\n{needed}"
    defined = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    # Symbols only a copy of libstdc++ itself defines: locales, and the extern-template ostream inserters.
    private = [
        line for line in defined.splitlines() if line.split()[-1].startswith(("_ZNSt6locale", "_ZNSo9_M_insert"))
    ]
    assert not private, f"{path} carries its own libstdc++ ({len(private)} symbols, e.g. {private[:3]})"
