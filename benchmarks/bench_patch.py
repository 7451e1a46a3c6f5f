"""``fnevr.patch`` on a generator with the authors' FNeVR structure: one training forward+backward at
vox-256, unpatched against patched: time per step, bytes saved for backward, and how close each
comes to a run in higher precision.

    python benchmarks/bench_patch.py [--published /tmp/FNeVR] [--device cuda] [--precision bf16] [--save DIR]
    python benchmarks/bench_patch.py --smoke       # small generator, one round: checks that it runs

The generator is the authors' ``OcclusionAwareGenerator_SPADE`` from a checkout of
``zengbohan0217/FNeVR`` (``--published``; their modules import ``einops``), else the one in
``tests/authors_layout.py`` (same classes, attributes and forwards, written from the published
facts). Weights: random, in the published layout (``tests/test_model.random_published_checkpoint``),
train mode. Input: a random 256² source and random keypoints with Jacobians, batch ``--batch``.
Loss: the mean square of the prediction and of the mini decoder's image. The two providers are
timed in turn for ``--rounds`` rounds, each keeping its best median of ``--steps`` steps. Saved for
backward: every tensor autograd saves, counted whole (``benchmarks/conftest.saved_MB``). Accuracy:
each provider's prediction and parameter gradients after one step, against the unpatched
generator one precision up (fp64 for fp32, fp32 for bf16), from the same state.
"""

import argparse
import contextlib
import copy
import datetime
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def published_generator(repo: Path | None, smoke: bool):
    """(generator class, its vox-256 arguments): theirs from a checkout, else ours in their layout."""
    import authors_layout

    if repo is None:
        return authors_layout.OcclusionAwareGenerator_SPADE, authors_layout.SMALL if smoke else authors_layout.VOX256
    import yaml

    sys.path.insert(0, str(repo))
    from modules.generator import OcclusionAwareGenerator_SPADE

    config = yaml.safe_load((repo / "config" / "vox-256.yaml").read_text())["model_params"]
    return OcclusionAwareGenerator_SPADE, {**config["generator_params"], **config["common_params"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=None, help="a checkout of zengbohan0217/FNeVR")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and provider (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over both providers (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--backend", default="auto", help="fnevr.patch's backend (default auto)")
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        help="directory to write patch-<published|layout>-<device>-<precision>-<date>.txt into",
    )
    parser.add_argument("--smoke", action="store_true", help="the small generator, one round of one step")
    args = parser.parse_args()
    if args.published is not None and not (args.published / "modules" / "generator.py").is_file():
        parser.error(
            f"--published {args.published}: no modules/generator.py there (a checkout of zengbohan0217/FNeVR?)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.rounds = 1, 1
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", "Default grid_sample")  # their F.grid_sample calls leave align_corners unset
    from test_model import random_published_checkpoint

    import fnevr
    from conftest import saved_MB

    cls, kwargs = published_generator(args.published, args.smoke)
    unpatched = cls(**kwargs)
    if not args.smoke:
        unpatched.load_state_dict(random_published_checkpoint()["generator"])
    unpatched.to(device).train()
    patched = copy.deepcopy(unpatched)
    report = fnevr.patch(patched, backend=args.backend)
    print(report, flush=True)

    gen = torch.Generator().manual_seed(0)
    K, size = kwargs["num_kp"], 64 if args.smoke else 256
    source = torch.rand(args.batch, 3, size, size, generator=gen).to(device)

    def keypoints():
        value = torch.rand(args.batch, K, 2, generator=gen) * 1.6 - 0.8
        jacobian = torch.eye(2) + 0.1 * torch.randn(args.batch, K, 2, 2, generator=gen)
        return {"value": value.to(device), "jacobian": jacobian.to(device)}

    kp_driving, kp_source = keypoints(), keypoints()
    autocast = torch.autocast(device.type, torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def step(model, dtype=None):
        """One training forward+backward; the prediction. dtype: the whole step in that precision."""
        inputs = (source, kp_driving, kp_source)
        if dtype is not None:
            inputs = tuple(
                t.to(dtype) if isinstance(t, torch.Tensor) else {k: v.to(dtype) for k, v in t.items()} for t in inputs
            )
        with autocast if dtype is None else contextlib.nullcontext():
            out = model(inputs[0], kp_driving=inputs[1], kp_source=inputs[2])
            loss = out["prediction"].float().square().mean() + out["render"].float().square().mean()
        loss.backward()
        return out["prediction"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Accuracy: one step of each from the same state (before timing changes the BatchNorm statistics),
    # against the unpatched model one precision up (fp64 for fp32, fp32 for bf16).
    higher = torch.float64 if args.precision == "fp32" else torch.float32
    reference = copy.deepcopy(unpatched).to(higher)
    expected = step(reference, higher).detach().double()
    expected_grads = [p.grad.double() for p in reference.parameters()]
    del reference
    scale = max(g.abs().max().item() for g in expected_grads if g is not None)
    errors = {}
    for name, model in (("unpatched", unpatched), ("fnevr.patch", patched)):
        prediction = step(model).detach().double()
        grads = [(p.grad, g) for p, g in zip(model.parameters(), expected_grads) if g is not None]
        errors[name] = (
            (prediction - expected).abs().max().item(),
            max((a.double() - b).abs().max().item() for a, b in grads) / scale,
        )

    def timed(model) -> tuple[float, float]:
        step(model)  # warm-up
        sync()
        times = []
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(model)
            sync()
            times.append(time.perf_counter() - start)
        peak = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step(model)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        return statistics.median(times), peak

    providers = {"unpatched": unpatched, "fnevr.patch": patched}
    results: dict = {}
    for _ in range(args.rounds):
        for name, model in providers.items():
            seconds, peak = timed(model)
            best = results.get(name, (seconds, peak))
            results[name] = (min(best[0], seconds), max(best[1], peak))
    saved = {name: saved_MB(lambda m=model: step(m)) for name, model in providers.items()}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    env = f"commit {commit.strip() or '?'}, torch {torch.__version__}, {device}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    )
    which = f"the authors' code ({args.published})" if args.published else "tests/authors_layout.py"
    lines = [
        f"fnevr.patch, generator fwd+bwd, {'small' if args.smoke else 'vox-256'}, batch {args.batch}, "
        f"{args.precision}, generator from {which}: {datetime.date.today()}, {env}",
        "",
        "| provider | fwd+bwd (ms) | vs unpatched | saved for backward (MB) | peak CUDA memory (MB) |",
        "|---|---|---|---|---|",
    ]
    base = results["unpatched"][0]
    for name, (seconds, peak) in results.items():
        cuda = f"{peak:.0f}" if device.type == "cuda" else "-"
        lines.append(f"| {name} | {seconds * 1e3:.0f} | {base / seconds:.2f}x | {saved[name]:.0f} | {cuda} |")
    lines += ["", f"One step from the same state against the unpatched model in {str(higher)[6:]}:"]
    for name, (prediction, grads) in errors.items():
        lines.append(f"  {name}: prediction max |diff| {prediction:.2e}, gradients max |diff| / max |grad| {grads:.2e}")
    lines += ["", str(report)]
    print("\n".join(lines), flush=True)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        source = "published" if args.published else "layout"
        out = args.save / f"patch-{source}-{device.type}-{args.precision}-{datetime.date.today()}.txt"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
