"""The memory budget of one training step: bytes saved for backward, by module, for the published
recipe and fnevr's, and the step time of each.

    python benchmarks/bench_memory.py                         # vox-256, batch 1, on the CPU
    python benchmarks/bench_memory.py --config small --batch 2 --recipes published fnevr
    python benchmarks/bench_memory.py --save benchmarks/results

One step is what ``fnevr train`` does per optimiser step: keypoint detector + generator + all
losses (VGG19 perceptual pyramid, GAN, feature matching, equivariance, mini-render L1) and their
backward, then the discriminator's forward and backward. Each storage autograd saves is counted
once, charged to the module that saved it (``fnevr.train.memory.SavedTensorLedger``); the two
backward passes are summed. VGG19 has random weights of the right shape unless ``--vgg-weights``
is given (the bytes do not depend on the values).

Recipes: ``published`` = plain PyTorch ops (the reference backend, PyTorch's grid_sample), fp32,
no fused ray head, no recomputation: the model as the authors' code runs it. ``published-bf16`` =
the same under bf16 autocast. ``fnevr`` = ``fnevr train``'s defaults; ``fnevr-bf16`` = with
``--precision bf16``; ``fnevr-checkpoint`` = with ``--checkpoint-activations``;
``fnevr-channels-last`` = with ``--channels-last on`` (the CUDA default).
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fnevr
from conftest import torch_grid_sample  # PyTorch's op, as the published code calls it
from fnevr.config import load_config
from fnevr.data.synthetic import ensure_synthetic_dataset
from fnevr.train import Trainer, TrainOptions
from fnevr.train.memory import SavedTensorLedger

GROUPS = {
    "": "losses (VGG19, pyramids, equivariance)",
    "generator": "generator glue (warp, occlusion, concat)",
    "generator.stem": "encoder",
    "generator.down": "encoder",
    "generator.dense_motion": "dense motion",
    "generator.renderer": "MLP + compositing",
    "generator.renderer.sample_mlp": "MLP + compositing",
    "generator.renderer.ray_sampler": "ray sampler",
    "generator.renderer.mini_decoder": "mini decoder",
    "generator.decoder": "SPADE decoder",
    "kp_detector": "keypoint detector",
    "discriminator": "discriminator",
    "pose_editor": "pose editor",
}
ROWS = [
    "encoder",
    "dense motion",
    "generator glue (warp, occlusion, concat)",
    "ray sampler",
    "MLP + compositing",
    "mini decoder",
    "SPADE decoder",
    "keypoint detector",
    "discriminator",
    "pose editor",
    "losses (VGG19, pyramids, equivariance)",
    "other",
]
RECIPES = {
    "published": dict(backend="reference", precision="fp32", fused_head="none", memory_saving=False),
    "published-bf16": dict(backend="reference", precision="bf16", fused_head="none", memory_saving=False),
    "fnevr": dict(),
    "fnevr-bf16": dict(precision="bf16"),
    "fnevr-checkpoint": dict(checkpoint_activations=True),
    "fnevr-channels-last": dict(channels_last=True),
}


@contextlib.contextmanager
def recipe_ops(name):
    if not name.startswith("published"):
        yield
        return
    original = fnevr.ops.grid_sample
    fnevr.ops.grid_sample = torch_grid_sample
    try:
        yield
    finally:
        fnevr.ops.grid_sample = original


def random_vgg19(folder: Path) -> str:
    from torchvision.models import vgg19

    path = folder / "vgg19-random.pth"
    torch.save(vgg19(weights=None).state_dict(), path)
    return str(path)


def build(recipe: str, args, data: str, vgg: str, out: Path) -> dict:
    """The recipe's trainer and its one batch, and the saved bytes of one step, by module."""
    opts = dict(RECIPES[recipe])
    config = load_config(args.config)
    if "fused_head" in opts:
        config["model_params"]["generator_params"]["render_params"]["fused_head"] = opts.pop("fused_head")
    with recipe_ops(recipe):
        trainer = Trainer(
            TrainOptions(
                config=config,
                data=data,
                out=str(out / recipe),
                device=args.device,
                batch_size=args.batch,
                num_workers=0,
                progress=False,
                vgg_weights=vgg,
                **opts,
            )
        )
        batch = next(iter(trainer._loader(0)))
        trainer.train_step([batch])  # warm-up (allocator, lazy init)
        with SavedTensorLedger(trainer.model, {trainer.gen_loss: "", trainer.disc_loss: ""}) as ledger:
            trainer.train_step([batch])
    trainer.close()
    return {
        "recipe": recipe,
        "trainer": trainer,
        "batch": batch,
        "groups": ledger.grouped(GROUPS),
        "total": ledger.total(),
        "modules": ledger.by_module(),
        "times": [],
        "dtype": str(trainer.amp_dtype or trainer.param_dtype)[6:],
    }


def time_steps(results: list[dict], rounds: int):
    """Median step time of each recipe, timed in turns (one step each per round), so that a slow
    spell of a shared machine does not favour one recipe."""
    for _ in range(rounds):
        for r in results:
            with recipe_ops(r["recipe"]):
                start = time.perf_counter()
                r["trainer"].train_step([r["batch"]])
                if r["trainer"].device.type == "cuda":
                    torch.cuda.synchronize()
                r["times"].append(time.perf_counter() - start)
    for r in results:
        r["step_s"] = statistics.median(r["times"])


def table(results: list[dict], batch: int) -> str:
    base = results[0]
    head = f"{'MB per sample':<42}" + "".join(f"{r['recipe']:>20}" for r in results)
    lines = [head, "-" * len(head)]
    for row in ROWS:
        if any(r["groups"].get(row) for r in results):
            lines.append(f"{row:<42}" + "".join(f"{r['groups'].get(row, 0) / 2**20 / batch:20.1f}" for r in results))
    lines.append("-" * len(head))
    lines.append(f"{'total':<42}" + "".join(f"{r['total'] / 2**20 / batch:20.1f}" for r in results))
    lines.append(
        f"{'share of ' + base['recipe']:<42}" + "".join(f"{r['total'] / base['total']:20.1%}" for r in results)
    )
    lines.append(f"{'autocast dtype':<42}" + "".join(f"{r['dtype']:>20}" for r in results))
    lines.append(f"{'step time (s, median)':<42}" + "".join(f"{r['step_s']:20.3f}" for r in results))
    lines.append(
        f"{'step time vs ' + base['recipe']:<42}" + "".join(f"{base['step_s'] / r['step_s']:19.2f}x" for r in results)
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vox-256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES)[:5], choices=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per recipe, taken in turns (median)")
    parser.add_argument("--vgg-weights", help="torchvision's vgg19 weights (default: random, same shapes)")
    parser.add_argument("--save", metavar="DIR", help="write memory-<config>-<device>-<date>.txt here")
    args = parser.parse_args()
    size = load_config(args.config)["dataset_params"]["frame_shape"][0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = str(
            ensure_synthetic_dataset(tmp / "data", size=size, num_frames=4, num_train=2, num_test=1, clips_per_id=1)
        )
        vgg = args.vgg_weights or random_vgg19(tmp)
        for recipe in args.recipes:
            results.append(build(recipe, args, data, vgg, tmp))
            print(
                f"{recipe}: {results[-1]['total'] / 2**20 / args.batch:.1f} MB per sample", file=sys.stderr, flush=True
            )
        time_steps(results, args.repeats)
    from run import environment

    env = environment()
    text = (
        f"Saved for backward in one training step ({args.config}, batch {args.batch}, {args.device}, "
        f"{env['cpu_threads']} threads; commit {env['commit']}, torch {env['torch']}, {env['date']})\n\n"
        + table(results, args.batch)
    )
    print(text)
    if args.save:
        path = Path(args.save) / f"memory-{args.config}-{args.device}-{env['date'][:10]}.txt"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
