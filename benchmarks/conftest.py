"""pytest-benchmark plumbing for fnevr's op benchmarks: per-call timing of a batch of calls, and
a closing table of median time, effective bandwidth and memory."""

import pytest
import torch

import fnevr

ROWS = []


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved, op=, provider=, mode=, dtype=, device=, **more): times fn (no
    arguments) and records median per-call time, effective GB/s (bytes_moved / time) and, on
    CUDA, the peak memory one call allocates beyond what was allocated before it."""

    def run(fn, bytes_moved, **info):
        device = torch.device(info["device"])
        for _ in range(3):  # warm-up: compilation, autotuning, allocator
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            info["peak_MB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        # Time a batch of back-to-back calls per round so a launch-and-sync per call does not
        # inflate short GPU kernels; report per call.
        calls = 1
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start[0].record()
            fn()
            start[1].record()
            _sync(device)
            calls = max(1, min(200, int(5.0 / max(start[0].elapsed_time(start[1]), 1e-3))))

        def batch():
            for _ in range(calls):
                fn()
            _sync(device)

        benchmark.pedantic(batch, rounds=20 if device.type == "cuda" else 3, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median / calls
        info.update(calls_per_round=calls, median_us=median * 1e6, GBps=bytes_moved / median / 1e9)
        if device.type == "cuda":  # device time alone, without the host's op-call overhead
            info["kernels_us"] = kernel_times(fn, device)
            info["kernel_us"] = sum(info["kernels_us"].values())
            info["kernel_GBps"] = bytes_moved / (info["kernel_us"] * 1e-6) / 1e9
        benchmark.extra_info.update(info)
        ROWS.append(info)
        return median

    return run


def measure_copy(measure, shape, dtype, device):
    """The baseline of the "% copy" column: a device copy of a tensor of ``shape``."""
    src = torch.rand(shape, device=device).to(dtype)
    dst = torch.empty_like(src)
    measure(
        lambda: dst.copy_(src),
        2 * src.numel() * src.element_size(),
        op="copy",
        provider="copy",
        mode="copy",
        dtype=str(dtype)[6:],
        device=device,
    )


def torch_grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False, *, backend="auto"):
    """fnevr.ops.grid_sample's signature on PyTorch's own op: the model as the published code runs it."""
    return torch.nn.functional.grid_sample(
        input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )


@pytest.fixture
def use_pytorch_grid_sample(monkeypatch):
    """Calling it makes the model use PyTorch's own grid_sample (as the published code does) for
    the rest of the test, instead of our gather-based reference."""
    return lambda: monkeypatch.setattr(fnevr.ops, "grid_sample", torch_grid_sample)


def saved_MB(fn) -> float:
    """MB that autograd saves for backward while fn() runs (each saved tensor counted whole)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        fn()
    return sum(saved) / 2**20


def train_saved_MB(trainer, batch) -> float:
    """MB one training step keeps for backward: each storage once, recipes of recomputed tensors as
    what they keep alive (``saved_MB`` would not see them)."""
    from fnevr.train.memory import SavedTensorLedger

    with SavedTensorLedger(trainer.model, {trainer.gen_loss: "", trainer.disc_loss: ""}) as ledger:
        trainer.train_step([batch])
    return ledger.total() / 2**20


def kernel_times(fn, device, calls=10) -> dict:
    """Device time per call of each kernel fn launches, in microseconds, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    return {e.key: e.self_device_time_total / calls for e in prof.key_averages() if e.self_device_time_total > 0}


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    copy = {(r["device"], r["dtype"]): r.get("kernel_GBps", r["GBps"]) for r in ROWS if r["provider"] == "copy"}
    tr = terminalreporter
    tr.section("fnevr benchmark summary (median per call; kernel = device time alone, from the profiler)")
    tr.write_line(
        f"{'op':<10} {'mode':<8} {'provider':<20} {'dtype':<9} {'device':<6} {'time':>11} "
        f"{'GB/s':>8} {'kernel':>11} {'GB/s':>8} {'% copy':>7} {'peak MB':>9} {'saved MB':>9}"
    )
    for r in ROWS:
        bw = r.get("kernel_GBps", r["GBps"])
        share = copy.get((r["device"], r["dtype"]))
        share = f"{100 * bw / share:6.0f}%" if share else "      -"
        kernel = f"{r['kernel_us']:9.1f}us {r['kernel_GBps']:8.1f}" if "kernel_us" in r else f"{'-':>11} {'-':>8}"
        peak = f"{r['peak_MB']:9.1f}" if "peak_MB" in r else "        -"
        saved = f"{r['saved_MB']:9.1f}" if "saved_MB" in r else "        -"
        tr.write_line(
            f"{r['op']:<10} {r['mode']:<8} {r['provider']:<20} {r['dtype']:<9} {r['device']:<6} "
            f"{r['median_us']:9.1f}us {r['GBps']:8.1f} {kernel} {share:>7} {peak} {saved}"
        )
    if any("frames" in r for r in ROWS):
        tr.section("frames (inference) or samples (training) per second")
        for r in ROWS:
            if "frames" in r:
                tr.write_line(
                    f"{r['provider']:<24} {r['mode']:<10} {r['dtype']:<6} {r['device']:<6} "
                    f"{r['frames'] / (r['median_us'] * 1e-6):9.1f} frames/s"
                )
    tr.section("kernels per call (us)")
    for r in ROWS:
        for name, us in r.get("kernels_us", {}).items():
            tr.write_line(f"{r['mode']:<8} {r['provider']:<20} {r['dtype']:<9} {us:9.1f}  {name[:110]}")


# --- for gpu_bench.py (benchmarks/gpu_check.sh): each bench_<op>.py has a gpu(s, dtype) ------------


def modes(op, inputs, grad_out, which=("forward", "backward", "fwd+bwd")):
    """mode -> a call: forward without autograd; backward alone (autograd.grad of a kept graph);
    forward+backward. Gradients by autograd.grad: nothing accumulates between calls."""
    calls = {}
    if "forward" in which:

        def forward():
            with torch.no_grad():
                return op(*inputs)

        calls["forward"] = forward
    if "backward" in which:
        out = op(*inputs)
        calls["backward"] = lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True, allow_unused=True)
    if "fwd+bwd" in which:
        calls["fwd+bwd"] = lambda: torch.autograd.grad(op(*inputs), inputs, grad_out, allow_unused=True)
    return calls


def gpu_copy(s, what, shape, dtype):
    """The copy bandwidth of `shape` in `dtype`: the 100% of an op's GB/s column in gpu_bench."""
    src = torch.rand(shape, device=s.device).to(dtype)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    row = s.run(
        lambda: dst.copy_(src),
        bench="copy",
        case=what,
        provider="copy",
        mode="copy",
        dtype=str(dtype)[6:],
        bytes=nbytes,
    )
    if row and "error" not in row:
        s.copy_GBps[(what, row["dtype"])] = row["GBps"]
