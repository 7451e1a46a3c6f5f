"""Smoke test of an installed fnevr wheel (``make wheel-check`` runs it in a fresh venv where no
compiler can be found): the compiled kernels load from the wheel, not from a source tree; every op
on the ``cpu`` backend matches the reference; the small model animates a frame; a checkpoint round
trip; ``fnevr --help``. Exits non-zero on the first failure."""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import fnevr
from fnevr import _extension

root = Path(fnevr.__file__).parent
assert "site-packages" in str(root), f"fnevr imported from {root}, not from an installed wheel"
assert _extension.cpu is not None, f"the wheel's CPU kernels did not load: {_extension.cpu_reason}"
print(f"fnevr {fnevr.__version__} from {root}; torch {torch.__version__}; compiled: {_extension.cpu.__file__}")
if _extension.cuda is not None:
    print(f"fnevr._C_cuda holds {_extension.cuda.cuda_archs}")

for name, op in fnevr.ops.ops().items():
    for dtype in (torch.float32, torch.float64):
        for sample in op.samples("cpu", dtype, torch.Generator().manual_seed(0)):
            got = op.fn(*sample.args, **sample.kwargs, backend="cpu")
            want = op.fn(*sample.args, **sample.kwargs, backend="reference")
            for a, b in zip(*((x if isinstance(x, tuple) else (x,)) for x in (got, want)), strict=True):
                err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                assert err <= op.tolerance[dtype], f"{name} {sample.label} {dtype}: error {err:.2e}"
    print(f"{name}: cpu backend matches the reference")

model = fnevr.FNeVR("small", training_modules=False).eval()
source, driving = torch.rand(2, 1, 3, 64, 64).unbind(0)
with torch.inference_mode():
    prediction = model(source, driving)["prediction"]
assert prediction.shape == (1, 3, 64, 64) and prediction.isfinite().all()
with tempfile.TemporaryDirectory() as folder:
    path = fnevr.save_checkpoint(Path(folder) / "small.pt", model)
    loaded, _ = fnevr.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
print("the small model animates a frame; checkpoint round trip")
subprocess.run([sys.executable, "-m", "fnevr", "--help"], check=True, capture_output=True)
print("wheel smoke test passed")
