"""The benchmarks of benchmarks/gpu_check.sh: each op at FNeVR's shapes against PyTorch eager and
``torch.compile`` of its reference, with % of the copy bandwidth; the op-call overhead at tiny
shapes; model inference frames/s; one vox-256 training step. Every row is printed and appended to
OUT/gpu-bench-STAMP.jsonl as soon as it is measured.

    python benchmarks/gpu_bench.py --out DIR --stamp STAMP [--groups composite,model] [--quick] [--dry-run]
    python benchmarks/gpu_bench.py --warm --groups grid_sample --dtypes bfloat16   # compile only

Three times per call, medians over rounds after warm-up: ``wall`` (many calls back to back, then
one sync: what a training loop sees), ``host`` (issuing those calls, before the sync) and
``kernel`` (device time: the calls queued behind a sleep kernel, so the device runs them back to
back, timed with CUDA events). wall >> kernel means the host is the bottleneck. Speed-ups compare
wall times. ``--warm`` runs every case once and times nothing: gpu_check.sh runs one such process
per group and dtype (``--list-shards``) in parallel while the tests run, so the Triton and
Inductor compiles land in their on-disk caches on many cores instead of one after another in the
timed process.

``--dry-run``: tiny shapes on CPU tensors, the cpu backend standing in for cuda and triton,
torch.compile with aot_eager; it walks every benchmark so the device is never the first place
this code runs. Shapes and inputs come from the bench_*.py modules (pytest-benchmark's versions).
"""

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import tempfile
import time
import traceback
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path

import bench_overhead
import torch

import fnevr
from conftest import kernel_times, torch_grid_sample, train_saved_MB

OPS = tuple(fnevr.ops.ops())  # each op's GPU benchmark is gpu(s, dtype) in its bench_<op>.py
GROUPS = (*OPS, "overhead", "model", "train")
# Providers whose calls compile nothing (PyTorch eager): --warm skips them.
EAGER = ("copy", "torch", "eager", "reference", "unfused", "published")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FUSED = ("cuda", "triton")


@dataclass
class Settings:
    out: Path | None
    stamp: str
    dry: bool
    quick: bool
    warm: bool
    dtypes: list
    providers: tuple | None = None  # only these (a --warm shard), or all
    fused = FUSED  # the backends benchmarked against PyTorch
    device: str = field(init=False)
    compiler: str | None = field(init=False)  # None: no torch.compile providers (--quick)

    def __post_init__(self):
        self.device = "cpu" if self.dry else "cuda"
        self.compiler = None if self.quick else ("aot_eager" if self.dry else "inductor")
        self.copy_GBps = {}  # (what, dtype) -> copy bandwidth measured in this run
        if not self.dry:
            self._calibrate_sleep()

    def backend(self, provider: str) -> str:
        """The backend a fused provider runs: itself on a GPU, the cpu backend in a dry run."""
        return "cpu" if self.dry else provider

    def compile(self, fn):
        return torch.compile(fn, backend=self.compiler, dynamic=False)

    # --- timing ------------------------------------------------------------------------------

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _calibrate_sleep(self):
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        self.cycles_per_s = 10_000_000 / (start.elapsed_time(end) * 1e-3)

    def measure(self, fn) -> dict:
        """wall, host and kernel time per call (us). Calls of 50 ms or more (the model, a training
        step) get fewer rounds and no kernel time (their host work is no launch overhead)."""
        calls, rounds, slow = 1, 1, False
        if not self.dry:
            fn()  # compiles, allocates
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            one = time.perf_counter() - start
            slow = one > 0.05
            rounds = 3 if self.quick or slow else 5
            for _ in range(0 if slow else 1):
                fn()
            calls = max(1, min(500, int((0.01 if self.quick else 0.025) / max(one, 1e-6))))  # hides the sync
        walls, hosts = [], []
        for _ in range(rounds):
            self.sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            issued = time.perf_counter()
            self.sync()
            walls.append((time.perf_counter() - start) / calls)
            hosts.append((issued - start) / calls)
        wall, host = statistics.median(walls), statistics.median(hosts)
        times = dict(wall_us=wall * 1e6, host_us=host * 1e6, calls=calls)
        if not slow:
            kernel = self._device_time(fn, host, calls) if self.device == "cuda" else wall
            times["kernel_us"] = min(kernel, wall) * 1e6
        return times

    def _device_time(self, fn, host_s, calls):
        """Device time per call: `k` calls queued behind a sleep long enough for the host to issue
        them all, so the device runs them back to back (launch overhead hidden)."""
        k = max(1, min(20, calls))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(min(2 * host_s * k + 2e-4, 0.5) * self.cycles_per_s))
        start.record()
        for _ in range(k):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / k

    # --- rows --------------------------------------------------------------------------------

    def run(self, fn, *, profile=False, **row):
        """Time fn (no arguments), or in --warm mode call it once; print and save the row. An
        error becomes a row too, except a CUDA error, after which the process cannot go on."""
        row = {
            "bench": row.pop("bench"),
            "case": row.pop("case"),
            "provider": row.pop("provider"),
            "mode": row.pop("mode"),
            "dtype": row.pop("dtype"),
            **row,
        }
        if self.providers and row["provider"] not in self.providers:
            return None
        try:
            if self.warm:
                if row["provider"] not in EAGER:
                    fn()
                    self.sync()
                return None
            row.update(self.measure(fn))
            if profile and self.device == "cuda" and not self.quick:
                row["kernels"] = _top_kernels(fn)
        except Exception as err:
            if not isinstance(err, torch.OutOfMemoryError) and ("CUDA error" in str(err) or "illegal" in str(err)):
                raise  # the CUDA context is lost
            if self.device == "cuda":
                torch.cuda.empty_cache()
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            traceback.print_exc(limit=2)
        self.emit(row)
        return row

    def emit(self, row):
        if "bytes" in row and "kernel_us" in row:
            row["GBps"] = row["bytes"] / (row["kernel_us"] * 1e-6) / 1e9
            copy = self.copy_GBps.get((row.pop("copy_of", None), row["dtype"]))
            if copy:
                row["copy_pct"] = 100 * row["GBps"] / copy
        print(format_row(row), flush=True)
        if self.out is not None:
            with open(self.out / f"gpu-bench-{self.stamp}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def format_row(r: dict) -> str:
    head = f"{r['bench']:<13} {r['case']:<24} {r['provider']:<18} {r['mode']:<8} {r['dtype']:<8}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    kernel = f"{r['kernel_us']:10.1f}" if "kernel_us" in r else f"{'-':>10}"
    text = f"{head} wall {r['wall_us']:10.1f} us  kernel {kernel} us  host {r['host_us']:9.1f} us"
    if "GBps" in r:
        text += f"  {r['GBps']:7.0f} GB/s"
    if "copy_pct" in r:
        text += f" {r['copy_pct']:4.0f}% copy"
    for key, unit in (("saved_MB", "MB saved"), ("peak_MB", "MB peak"), ("per_s", r.get("per_s_unit", "/s"))):
        if key in r:
            text += f"  {r[key]:.1f} {unit}"
    return text


def _top_kernels(fn, n=6) -> dict:
    times = kernel_times(fn, torch.device("cuda"), calls=5)
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:n])


# --- what is timed -----------------------------------------------------------------------------


def bench_overhead_(s, dtype):
    """Tiny inputs (bench_overhead's), fp32: the time is the cost of getting to the kernel."""
    for op in bench_overhead.OPS:
        for provider in ("torch",) + FUSED:
            fn, args = bench_overhead._call(op, s.backend(provider) if provider in FUSED else provider)
            inputs = tuple(a.requires_grad_() for a in args)

            def forward(fn=fn, inputs=inputs):
                with torch.no_grad():
                    return fn(*inputs)

            def fwd_bwd(fn=fn, inputs=inputs):
                return torch.autograd.grad(fn(*inputs).sum(), inputs, allow_unused=True)

            for mode, call in (("forward", forward), ("fwd+bwd", fwd_bwd)):
                s.run(call, bench="overhead", case=f"{op}-tiny", provider=provider, mode=mode, dtype="float32")


def pytorch_grid_sample():
    """The model on PyTorch's own grid_sample (as the published code), not our reference."""
    return unittest.mock.patch.object(fnevr.ops, "grid_sample", torch_grid_sample)


def bench_model_(s, dtype):
    """Inference as `fnevr animate` runs it: keypoints of the driving frames + the generator, under
    bf16 autocast or in fp32; vox-256 at 256x256 (dry run: the small config at 32x32). The
    reference (PyTorch ops and PyTorch's grid_sample: the published code) in fp32 only: under
    autocast PyTorch's grid_sample returns fp32, and spade_norm refuses fp32 features with bf16
    modulation."""
    config, size, batches = ("small", 32, (1,)) if s.dry else ("vox-256", 256, (1, 16))
    torch.manual_seed(0)
    model = fnevr.FNeVR(config, training_modules=False).to(s.device).eval()
    amp = torch.autocast(s.device, dtype=dtype, enabled=dtype != torch.float32)
    backends = ("auto",) if s.quick or dtype != torch.float32 else ("auto", "reference")
    for backend in backends:
        model.set_backend(backend)
        with pytorch_grid_sample() if backend == "reference" else contextlib.nullcontext():
            for batch in batches:
                source = torch.rand(1, 3, size, size, device=s.device)
                driving = torch.rand(batch, 3, size, size, device=s.device)
                with torch.no_grad(), amp:
                    kp_source = {k: v.expand(batch, *v.shape[1:]) for k, v in model.kp_detector(source).items()}

                def step(batch=batch, source=source, driving=driving, kp_source=kp_source, model=model):
                    with torch.no_grad(), amp:
                        return model.animate(source.expand(batch, -1, -1, -1), kp_source, model.kp_detector(driving))

                row = s.run(
                    step, bench="model", case=f"{config}-b{batch}", provider=backend, mode="infer", dtype=str(dtype)[6:]
                )
                if row and "error" not in row:
                    row["per_s"] = batch / (row["wall_us"] * 1e-6)
                    print(
                        f"{'':<13} {config} batch {batch} {backend} {row['dtype']}: {row['per_s']:.1f} frames/s",
                        flush=True,
                    )
                    _rewrite_last(s, row)
    del model


def _rewrite_last(s, row):
    """Replace the last saved row by `row` (a figure derived after it was written)."""
    if s.out is None:
        return
    path = s.out / f"gpu-bench-{s.stamp}.jsonl"
    lines = path.read_text().splitlines()
    lines[-1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def _random_vgg19(path: Path):
    """VGG19's feature trunk with random weights in torchvision's layout (speed does not depend on
    the values; no download)."""
    from torchvision.models import vgg19

    with torch.device("meta"):
        trunk = vgg19(weights=None).features[:30]
    trunk = trunk.to_empty(device="cpu")
    for p in trunk.parameters():
        torch.nn.init.normal_(p, std=0.01)
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)


def bench_train_(s, dtype):
    """One optimiser step of fnevr's Trainer (generator, keypoint detector, discriminator, pose
    editor, all losses with a VGG19 of random weights), bench_train's providers: vox-256, batch 8
    (dry run: the small config at 32x32, batch 2). s/step, peak memory of a step, saved for backward."""
    from bench_train import PROVIDERS

    from fnevr.config import load_config
    from fnevr.data.synthetic import ensure_synthetic_dataset
    from fnevr.train import Trainer, TrainOptions

    config_name, size, batch = ("small", 32, 2) if s.dry else ("vox-256", 256, 8)
    # (the dry run skips the bf16 and checkpointing variants: the same code with other options)
    names = (
        ["fnevr"]
        if s.quick
        else (["fnevr", "published"] if s.dry else ["fnevr", "fnevr-checkpoint", "published", "published-bf16-cl"])
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ensure_synthetic_dataset(
            tmp / "set", size=size, num_frames=4, num_train=batch, num_test=1, clips_per_id=1
        )
        _random_vgg19(tmp / "vgg19.pth")
        for name in names:
            if (s.providers and name not in s.providers) or (s.warm and name in EAGER):
                continue
            opts = dict(PROVIDERS[name])
            config = load_config(config_name)
            if "fused_head" in opts:
                config["model_params"]["generator_params"]["render_params"]["fused_head"] = opts.pop("fused_head")
            if s.dry:  # as tests/test_train.py's tiny config
                config["dataset_params"]["frame_shape"] = [size, size, 3]
                config["model_params"]["discriminator_params"]["num_blocks"] = 3
            with pytorch_grid_sample() if opts.get("backend") == "reference" else contextlib.nullcontext():
                trainer = Trainer(
                    TrainOptions(
                        config=config,
                        data=str(data),
                        out=str(tmp / name),
                        device=s.device,
                        batch_size=batch,
                        num_workers=0,
                        progress=False,
                        vgg_weights=str(tmp / "vgg19.pth"),
                        **opts,
                    )
                )
                step_batch = next(iter(trainer._loader(0)))
                saved = None if s.warm else train_saved_MB(trainer, step_batch)
                if s.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                row = s.run(
                    lambda trainer=trainer, step_batch=step_batch: trainer.train_step([step_batch]),
                    bench="train",
                    case=f"{config_name}-b{batch}",
                    provider=name,
                    mode="step",
                    dtype=str(trainer.amp_dtype or torch.float32)[6:],
                    saved_MB=saved,
                )
                if row and "error" not in row:
                    if s.device == "cuda":
                        row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    row.update(
                        per_s=batch / (row["wall_us"] * 1e-6), per_s_unit="samples/s", s_per_step=row["wall_us"] * 1e-6
                    )
                    peak = f", peak {row['peak_MB']:.0f} MB" if "peak_MB" in row else ""
                    print(f"{'':<13} train {name}: {row['s_per_step']:.3f} s/step{peak}", flush=True)
                    _rewrite_last(s, row)
            del trainer
            if s.device == "cuda":
                torch.cuda.empty_cache()  # the next provider's peak starts from the same place


BENCHES = {
    **{op: importlib.import_module(f"bench_{op}").gpu for op in OPS},
    "overhead": bench_overhead_,
    "model": bench_model_,
    "train": bench_train_,
}
ONE_DTYPE = ("overhead", "train")  # fp32 tiny calls; the step's precision is the Trainer's own


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="append rows to OUT/gpu-bench-STAMP.jsonl")
    parser.add_argument("--stamp", default="adhoc")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; no torch.compile, no baselines to re-time")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the cpu backend for cuda and triton")
    parser.add_argument("--warm", action="store_true", help="run each case once (compiles), time nothing")
    parser.add_argument("--providers", help="comma-separated: only these providers")
    parser.add_argument(
        "--list-shards",
        action="store_true",
        help="print the '--groups G --dtypes D' pairs that split --groups for parallel --warm runs "
        "(with --dry-run one line, fp32: nothing compiles long on the CPU)",
    )
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if args.list_shards:
        if args.dry_run:
            print(f"--groups {args.groups} --dtypes {dtypes[0]}")
            return 0
        for group in args.groups.split(","):
            for dtype in dtypes[:1] if group in ONE_DTYPE else dtypes:
                if group == "train":  # each step compiles many kernels: a shard per configuration
                    for name in ("fnevr", "fnevr-checkpoint"):
                        print(f"--groups {group} --dtypes {dtype} --providers {name}")
                else:
                    print(f"--groups {group} --dtypes {dtype}")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    s = Settings(
        args.out,
        args.stamp,
        args.dry_run,
        args.quick,
        args.warm,
        [DTYPES[d] for d in dtypes],
        tuple(args.providers.split(",")) if args.providers else None,
    )
    for group in args.groups.split(","):
        for dtype in s.dtypes[:1] if group in ONE_DTYPE else s.dtypes:
            start = time.perf_counter()
            BENCHES[group](s, dtype)
            s.sync()
            label = "warm" if s.warm else "bench"
            print(f"--- {label} {group} {str(dtype)[6:]}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
