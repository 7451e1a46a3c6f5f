"""The README's CPU table: fnevr's ops and the whole model against PyTorch on this machine's CPU.

    python benchmarks/cpu_table.py                          # everything, 1 and 2 threads (~10 min on 2 cores)
    python benchmarks/cpu_table.py --only grid_sample --threads 1
    python benchmarks/cpu_table.py --save benchmarks/results  # also write cpu-table-<date>.txt there
    python benchmarks/cpu_table.py --smoke                  # tiny shapes, one round: checks that it runs

Rows:
- grid_sample at FNeVR's warps (benchmarks/bench_grid_sample.py's cases at batch 1): PyTorch's
  ``F.grid_sample`` against the ``cpu`` backend and ``auto`` (which runs PyTorch's op where that is
  the faster: ``fnevr.ops.backends("cpu", "grid_sample")["auto"]``); forward, and forward+backward
  with gradients for input and grid.
- spade_norm at the decoder's three shapes (NCHW): the eager composition (instance_norm, modulation,
  ReLU) against the ``cpu`` backend.
- The model at vox-256, batch 1, random weights in the published layout (tests/test_model.py):
  tests/published_model.py (the authors' forward pass in plain PyTorch) against fnevr (``auto``
  backends, :meth:`FNeVR.channels_last`, as ``fnevr animate`` runs it); inference, and a
  keypoint-detector + generator forward and backward (BatchNorm on its running statistics in both).

Timing: each provider's median over repeated calls (at least 5, about 0.4 s), providers taken in
turn for several rounds, the best median kept; speed-ups are ratios of those, from one run.
Absolute times on a shared 2-core machine move by 10-30% from run to run; the ratios less.
"""

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_grid_sample import _inputs, cases  # noqa: E402
from bench_spade_norm import eager, shapes  # noqa: E402
from run import environment  # noqa: E402

import fnevr  # noqa: E402
from fnevr.ops import grid_sample, spade_norm  # noqa: E402


def median_time(fn, budget: float) -> float:
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_of(fns: dict, rounds: int, budget: float) -> dict[str, float]:
    """Each provider's best median over `rounds` rounds, providers alternating."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_time(fn, budget))
    return best


def timed(op, tensors, grad_out, backward):
    """A call of op(*tensors): under no_grad, or forward + backward(grad_out)."""
    if backward:

        def run():
            for t in tensors:
                t.grad = None
            op(*tensors).backward(grad_out)
    else:

        def run():
            with torch.no_grad():
                op(*tensors)

    return run


def grid_sample_rows(smoke, rounds, budget):
    for case, spec in cases(1, size=8 if smoke else 64).items():
        for backward in (False, True):
            x, grid, padding = _inputs(case, torch.float32, backward, spec, "cpu")
            grad_out = torch.rand(x.shape[0], x.shape[1], *grid.shape[1:3])
            ops = {
                "pytorch": lambda a, g: F.grid_sample(a, g, padding_mode=padding, align_corners=False),
                "cpu": lambda a, g: grid_sample(a, g, "bilinear", padding, False, backend="cpu"),
                "auto": lambda a, g: grid_sample(a, g, "bilinear", padding, False, backend="auto"),
            }
            fns = {name: timed(op, (x, grid), grad_out, backward) for name, op in ops.items()}
            layout = "channels_last" if spec[3] else "NCHW"
            shape = "x".join(map(str, spec[0]))
            yield f"grid_sample {case} [{shape}] {layout}", backward, best_of(fns, rounds, budget)


def spade_rows(smoke, rounds, budget):
    for shape in shapes(1, size=16 if smoke else 256):
        for backward in (False, True):
            torch.manual_seed(0)
            x, gamma, beta, grad_y = (torch.randn(shape) for _ in range(4))
            for t in (x, gamma, beta):
                t.requires_grad_(backward)
            fns = {
                "pytorch": timed(eager, (x, gamma, beta), grad_y, backward),
                "cpu": timed(
                    lambda a, g, b: spade_norm(a, g, b, activation="relu", backend="cpu"),
                    (x, gamma, beta),
                    grad_y,
                    backward,
                ),
            }
            yield f"spade_norm [{'x'.join(map(str, shape))}] NCHW", backward, best_of(fns, rounds, budget)


def model_rows(smoke, rounds, budget):
    from published_model import generator as published_generator
    from published_model import keypoints as published_keypoints
    from test_model import frames, random_published_checkpoint

    from fnevr.checkpoint import load_checkpoint

    ckpt = random_published_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000099-checkpoint.pth.tar"
        torch.save(ckpt, path)
        model = load_checkpoint(path, "vox-256", training_modules=False)[0].eval()
    size = 128 if smoke else 256  # vox-256 needs 128 at least (its keypoint hourglass)
    source, driving = frames(1, size)
    sd = ckpt

    def published():
        kp_s, kp_d = published_keypoints(sd["kp_detector"], source), published_keypoints(sd["kp_detector"], driving)
        return published_generator(sd["generator"], source, kp_d, kp_s)["prediction"]

    cl = copy.deepcopy(model).channels_last()
    runs = {
        "pytorch": published,
        "fnevr": lambda: cl(source, driving)["prediction"],
        "fnevr-nchw": lambda: model(source, driving)["prediction"],
    }
    for backward in (False, True):
        if backward:
            for net in sd.values():
                for k, v in net.items():
                    if v.is_floating_point() and "running" not in k:
                        v.requires_grad_()

            def step(fn):
                def run():
                    for m in (model, cl):
                        m.zero_grad(set_to_none=True)
                    fn().sum().backward()

                return run
        else:

            def step(fn):
                def run():
                    with torch.no_grad():
                        fn()

                return run

        fns = {name: step(fn) for name, fn in runs.items()}
        yield f"model vox-256 [1x3x{size}x{size}]", backward, best_of(fns, max(1, rounds - 1), budget)


GROUPS = {"grid_sample": grid_sample_rows, "spade_norm": spade_rows, "model": model_rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (default 1,2)")
    parser.add_argument("--model-threads", default=None, help="thread counts for the model rows (default: the largest)")
    parser.add_argument("--save", type=Path, default=None, help="directory to write cpu-table-<date>.txt into")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one round (checks that it runs)")
    args = parser.parse_args()
    if fnevr.ops.backends("cpu")["cpu"] != "available":
        parser.error(f"the cpu backend is needed: {fnevr.ops.backends('cpu')['cpu']}")
    threads = [int(t) for t in args.threads.split(",")]
    model_threads = [int(t) for t in args.model_threads.split(",")] if args.model_threads else [max(threads)]
    rounds, budget = (1, 0.0) if args.smoke else (3, 0.4)
    env = environment()
    lines = [
        f"fnevr CPU table: {env['date']} commit {env['commit']}, torch {env['torch']}, {os.cpu_count()} CPUs",
        f"auto for grid_sample: {fnevr.ops.backends('cpu', 'grid_sample')['auto']}",
        "",
        "| op, shape | threads | mode | PyTorch | fnevr | speed-up | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for group in args.only:
        for n in model_threads if group == "model" else threads:
            torch.set_num_threads(n)
            for label, backward, t in GROUPS[group](args.smoke, rounds, budget):
                ours = t["fnevr"] if "fnevr" in t else t["cpu"]
                note = f"auto {t['pytorch'] / t['auto']:.2f}x" if "auto" in t else ""
                if "fnevr-nchw" in t:
                    note = f"without channels_last {t['pytorch'] / t['fnevr-nchw']:.2f}x"
                mode = "fwd+bwd" if backward else "inference" if group == "model" else "forward"
                row = (
                    f"| {label} | {n} | {mode} | {_ms(t['pytorch'])} | {_ms(ours)} "
                    f"| {t['pytorch'] / ours:.2f}x | {note} |"
                )
                lines.append(row)
                print(row, flush=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        out = args.save / f"cpu-table-{datetime.date.today()}.txt"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
