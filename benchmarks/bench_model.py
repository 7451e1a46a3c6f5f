"""Inference speed of the whole FNeVR model (keypoints of the driving frames + generator), in
frames per second: the reference ops (plain PyTorch) against the fused backends.

On a GPU: the vox-256 config at 256x256, batch 1 and 16, fp32 and bf16 autocast. On a CPU: the
small config at 64x64 (vox-256 takes seconds per frame there). ``reference`` runs plain PyTorch
ops, with PyTorch's own grid_sample in place of our gather-based reference, in fp32 only (as the
published code): under autocast PyTorch's grid_sample returns fp32 features, which spade_norm
refuses next to bf16 modulation.
"""

import contextlib

import pytest
import torch

import fnevr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG, SIZE = ("vox-256", 256) if DEVICE == "cuda" else ("small", 64)
PRECISIONS = ["fp32", "bf16"] if DEVICE == "cuda" else ["fp32"]
CASES = [(b, p) for b in ("reference", "auto") for p in PRECISIONS if not (b == "reference" and p == "bf16")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fnevr.FNeVR(CONFIG, training_modules=False).to(DEVICE).eval()


@pytest.mark.parametrize("backend, precision", CASES)
@pytest.mark.parametrize("batch", [1, 16])
def test_inference(measure, model, use_pytorch_grid_sample, backend, batch, precision):
    model.set_backend(backend)
    if backend == "reference":
        use_pytorch_grid_sample()
    source = torch.rand(1, 3, SIZE, SIZE, device=DEVICE)
    driving = torch.rand(batch, 3, SIZE, SIZE, device=DEVICE)
    amp = torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), amp:
        kp_source = model.kp_detector(source)
        kp_source = {k: v.expand(batch, *v.shape[1:]) for k, v in kp_source.items()}

    def step():
        with torch.no_grad(), amp:
            model.animate(source.expand(batch, -1, -1, -1), kp_source, model.kp_detector(driving))

    median = measure(
        step,
        0,
        op="fnevr",
        provider=f"{CONFIG}/{backend}",
        mode=f"infer-b{batch}",
        dtype=precision,
        device=DEVICE,
        frames=batch,
    )
    assert median > 0
