"""Training speed and memory: one optimiser step (generator + keypoint detector + discriminator +
pose editor, all losses) of the published recipe against fnevr's.

Providers: ``published`` = plain PyTorch ops (the reference backend, with PyTorch's own grid_sample
in place of our gather-based reference), fp32, eager, every activation kept, as the published code
runs; ``published-bf16-cl`` = the same under bf16 autocast with channels_last;
``published-bf16-compile`` = that under torch.compile; ``fnevr`` = ``fnevr train``'s defaults (fused
ops, memory saving; bf16 and channels_last on a GPU, fp32 on a CPU); ``fnevr-checkpoint`` = with
``--checkpoint-activations``; ``fnevr-compile`` = with ``--compile``. On a GPU: vox-256 at 256x256,
batch 8; on a CPU: the small config, batch 8. ``saved_MB`` is what the forward pass keeps for
backward (device independent; by module: ``bench_memory.py``); ``peak_MB`` (GPU) the peak
allocation of one step beyond the model and optimiser state.
"""

import pytest
import torch

from conftest import train_saved_MB
from fnevr.config import load_config
from fnevr.data.synthetic import ensure_synthetic_dataset
from fnevr.train import Trainer, TrainOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG, SIZE = ("vox-256", 256) if DEVICE == "cuda" else ("small", 64)
PLAIN = dict(backend="reference", memory_saving=False, fused_head="none")
PROVIDERS = {
    "published": dict(PLAIN, precision="fp32", channels_last=False),
    "published-bf16-cl": dict(PLAIN, precision="bf16", channels_last=True),
    "published-bf16-compile": dict(PLAIN, precision="bf16", channels_last=True, compile=True),
    "fnevr": dict(),
    "fnevr-checkpoint": dict(checkpoint_activations=True),
    "fnevr-compile": dict(compile=True),
}
if DEVICE == "cpu":  # compiling the whole model takes minutes on this CPU
    PROVIDERS = {k: v for k, v in PROVIDERS.items() if "compile" not in k}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "set", size=SIZE, num_frames=4, num_train=8, num_test=1, clips_per_id=1
    )


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(measure, data, tmp_path, use_pytorch_grid_sample, provider):
    opts = dict(PROVIDERS[provider])
    if opts.get("backend") == "reference":
        use_pytorch_grid_sample()
    config = load_config(CONFIG)
    if "fused_head" in opts:
        config["model_params"]["generator_params"]["render_params"]["fused_head"] = opts.pop("fused_head")
    trainer = Trainer(
        TrainOptions(
            config=config,
            data=str(data),
            out=str(tmp_path),
            device=DEVICE,
            batch_size=8,
            num_workers=0,
            progress=False,
            **opts,
        )
    )
    batch = next(iter(trainer._loader(0)))
    saved = train_saved_MB(trainer, batch)
    measure(
        lambda: trainer.train_step([batch]),
        0,
        op="train",
        provider=provider,
        mode=f"step-b8-{SIZE}",
        dtype=str(trainer.amp_dtype or torch.float32)[6:],
        device=DEVICE,
        frames=8,
        saved_MB=saved,
    )
