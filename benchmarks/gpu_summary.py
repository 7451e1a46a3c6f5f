"""The last stage of benchmarks/gpu_check.sh: one line per target of issue 12's "Targets" (measured
value, target, met or not, or "not measured" when its stage was cut or did not run), which
backend was faster per op next to what ``auto`` picks, and the model and training figures. Reads
this run's files in OUT (gpu-bench-STAMP.jsonl, gpu-tests-STAMP.txt, gpu-stages-STAMP.txt) and
writes gpu-summary-STAMP.txt and .json there.

    python benchmarks/gpu_summary.py --out DIR --stamp STAMP [--quick] [--dry-run]
    python benchmarks/gpu_summary.py --coverage TESTS_TXT [--fp64]

--coverage checks that the GPU tests listed in a pytest log (-v, or --collect-only -q) cover every
op x backend (cuda, triton) x dtype, and exits 1 if not. A --quick run re-times no baseline
(torch.compile, the reference model): the newest full run's rows in OUT stand in, marked "*".
"""

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fnevr.ops import _registry

OPS = tuple(_registry.ops())
FUSED = ("cuda", "triton")
BENCH_DTYPES = ("float32", "bfloat16")
TEST_DTYPES = ("float32", "float16", "bfloat16")
THREE_CHANNEL = ("motion", "visual", "equivariance")
OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST = re.compile(r"tests/\S+?\.py::[^\s\[]+")


# --- inputs ------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_tests(path: Path) -> dict[str, str]:
    """nodeid -> PASSED/FAILED/ERROR/SKIPPED/... from a pytest -v log, or "collected" from a
    --collect-only -q listing. Later lines win (the short summary repeats failures)."""
    outcomes = {}
    if not path.is_file():
        return outcomes
    for line in path.read_text(errors="replace").splitlines():
        node = _nodeid(line)
        if node:
            outcome = OUTCOME.search(line.replace(node, ""))
            outcomes[node] = outcome.group(1) if outcome else "collected"
    return outcomes


def _nodeid(line: str) -> str | None:
    """The test id in `line`: the test's name and its bracketed parameter ids (which may hold
    spaces and brackets of their own, so the closing bracket is found by depth)."""
    found = TEST.search(line)
    if not found:
        return None
    start = found.end()
    end = start
    if line[start : start + 1] == "[":
        depth = 0
        for end in range(start, len(line)):
            depth += {"[": 1, "]": -1}.get(line[end], 0)
            if depth == 0:
                break
        end += 1
    return line[found.start() : end]


def coverage(outcomes: dict[str, str], dtypes) -> dict[tuple, str]:
    """(op, backend, dtype) -> the best outcome among the tests of tests/test_<op>.py that run it
    (ids carry "<backend>-cuda" and "torch.<dtype>"), None if none does."""
    rank = {"PASSED": 0, "collected": 1, "SKIPPED": 2}
    best = {(op, b, d): None for op in OPS for b in FUSED for d in dtypes}
    for node, outcome in outcomes.items():
        op = re.match(r"tests/test_(\w+)\.py::", node)
        for b in FUSED:
            for d in dtypes:
                key = (op and op.group(1), b, d)
                if (
                    key in best
                    and f"{b}-cuda" in node
                    and f"torch.{d}" in node
                    and (best[key] is None or rank.get(outcome, 3) < rank.get(best[key], 3))
                ):
                    best[key] = outcome
    return best


class Rows:
    """This run's benchmark rows, and a full run's for the baselines a --quick run skips."""

    def __init__(self, rows, baseline=()):
        self.rows, self.baseline = {}, {}
        for target, source in ((self.rows, rows), (self.baseline, baseline)):
            for r in source:
                if "error" not in r:
                    target[(r["bench"], r["case"], r["provider"], r["mode"], r["dtype"])] = r
        self.used_baseline = False

    def get(self, bench, case, provider, mode, dtype):
        key = (bench, case, provider, mode, dtype)
        if key in self.rows:
            return self.rows[key]
        if key in self.baseline:
            self.used_baseline = True
            return {**self.baseline[key], "baseline": True}
        return None

    def cases(self, bench):
        return sorted({k[1] for k in list(self.rows) + list(self.baseline) if k[0] == bench})

    def best(self, bench, case, mode, dtype, providers=FUSED):
        """(provider, row) of the fastest of `providers` (by wall time), or (None, None)."""
        found = [(p, self.get(bench, case, p, mode, dtype)) for p in providers]
        found = [(p, r) for p, r in found if r]
        return min(found, key=lambda pr: pr[1]["wall_us"]) if found else (None, None)


# --- the targets -------------------------------------------------------------------------------


@dataclass
class Line:
    name: str
    measured: str
    target: str
    status: str  # met, NOT MET, not measured, dry run (figures from CPU stand-ins mean nothing)


def _line(name, value, goal, fmt, higher=True, note=""):
    target = f"{'>=' if higher else '<='} {fmt(goal)}"
    if value is None:
        return Line(name, "-", target, "not measured")
    met = value >= goal if higher else value <= goal
    return Line(name, fmt(value) + (f" ({note})" if note else ""), target, "met" if met else "NOT MET")


def _ratio(v):
    return f"{v:.2f}x"


def _pct(v):
    return f"{v:.0f}%"


def _us(v):
    return f"{v:.1f} us"


def _speedup(R, bench, case, mode, dtype, baseline, providers=FUSED):
    """baseline wall / fastest fused wall, and the fused provider's name (marked * if the
    baseline came from another run)."""
    base = R.get(bench, case, baseline, mode, dtype)
    provider, row = R.best(bench, case, mode, dtype, providers)
    if not base or not row:
        return None, ""
    return base["wall_us"] / row["wall_us"], provider + ("; baseline*" if base.get("baseline") else "")


def _worst(items):
    """The smallest (value, note) of items whose value is known, or (None, "")."""
    known = [(v, n) for v, n in items if v is not None]
    return min(known, key=lambda vn: vn[0]) if known else (None, "")


def _case(R, bench, pattern, fallback):
    """The measured case of `bench` matching `pattern` (shapes differ between GPU and dry runs)."""
    found = [c for c in R.cases(bench) if re.fullmatch(pattern, c)]
    return found[0] if found else fallback


def target_lines(R: Rows, tests: dict[str, str], quick: bool, auto_order: dict) -> list[Line]:
    lines = []
    comp = _case(R, "composite", r"[\dx]+", "?")
    for dt in BENCH_DTYPES:
        for mode in ("forward", "backward"):
            provider, row = R.best("composite", comp, mode, dt)
            value = row.get("copy_pct") if row else None
            lines.append(
                _line(f"composite {mode}, {dt}: % of copy bandwidth (kernel time)", value, 85, _pct, note=provider)
            )
        value, note = _speedup(R, "composite", comp, "fwd+bwd", dt, "compiled-reference")
        lines.append(_line(f"composite fwd+bwd, {dt}: x torch.compile(reference)", value, 1.5, _ratio, note=note))
    for dt in BENCH_DTYPES:
        for case in ("feature", "feature-nchw"):
            for mode, goal in (("backward", 2.0), ("forward", 1.2)):
                value, note = _speedup(R, "grid_sample", case, mode, dt, "torch")
                lines.append(
                    _line(
                        f"grid_sample {case} [B,256,64,64] {mode}, {dt}: x F.grid_sample",
                        value,
                        goal,
                        _ratio,
                        note=note,
                    )
                )
        value, note = _worst(
            [
                (v, f"{case} {mode}: {n}")
                for case in THREE_CHANNEL
                for mode in ("forward", "fwd+bwd")
                for v, n in [_speedup(R, "grid_sample", case, mode, dt, "torch")]
            ]
        )
        lines.append(
            _line(f"grid_sample 3-channel warps (worst), {dt}: x F.grid_sample", value, 1.0, _ratio, note=note)
        )
    for dt in BENCH_DTYPES:
        for layout in ("nchw", "channels_last"):
            cases = [c for c in R.cases("spade_norm") if c.endswith("-" + layout)]
            value, note = _worst(
                [
                    (v, f"{c.rsplit('-', 1)[0]}: {n}")
                    for c in cases
                    for v, n in [_speedup(R, "spade_norm", c, "fwd+bwd", dt, "eager")]
                ]
            )
            lines.append(
                _line(f"spade_norm fwd+bwd {layout} (worst shape), {dt}: x eager", value, 2.5, _ratio, note=note)
            )
            compiled = [c for c in cases if R.get("spade_norm", c, "compiled-eager", "fwd+bwd", dt)]
            value, note = (
                _speedup(R, "spade_norm", compiled[0], "fwd+bwd", dt, "compiled-eager") if compiled else (None, "")
            )
            lines.append(
                _line(
                    f"spade_norm fwd+bwd {layout}, {dt}: x torch.compile(eager)",
                    value,
                    1.3,
                    _ratio,
                    note=(compiled[0].rsplit("-", 1)[0] + ": " + note) if compiled else "",
                )
            )
    mlp = _case(R, "mlp_composite", r".*-H128", "?")
    fused_mlp = tuple(f"mlp-{b}" for b in FUSED)
    for dt in BENCH_DTYPES:
        for baseline, goal in (("unfused", 2.0), ("compiled-unfused", 1.3)):
            value, note = _speedup(R, "mlp_composite", mlp, "fwd+bwd", dt, baseline, fused_mlp)
            lines.append(
                _line(f"mlp_composite vox-256 head fwd+bwd, {dt}: x {baseline}", value, goal, _ratio, note=note)
            )
        provider, row = R.best("mlp_composite", mlp, "fwd+bwd", dt, fused_mlp)
        unfused = R.get("mlp_composite", mlp, "unfused", "fwd+bwd", dt)
        value = 100 * (1 - row["saved_MB"] / unfused["saved_MB"]) if row and unfused else None
        lines.append(
            _line(
                f"mlp_composite saved for backward, {dt}: less than unfused",
                value,
                90,
                _pct,
                note=f"{row['saved_MB']:.3g} vs {unfused['saved_MB']:.3g} MB" if value is not None else "",
            )
        )
    for op in OPS:  # host overhead at FNeVR's shapes, with the backend auto picks
        backend = auto_order.get(op, "triton")
        bench, providers = (op, (f"mlp-{backend}",)) if op == "mlp_composite" else (op, (backend,))
        items = []
        for case in R.cases(bench):
            for dt in BENCH_DTYPES:
                for mode in ("forward", "fwd+bwd"):
                    row = R.get(bench, case, providers[0], mode, dt)
                    if row and row.get("kernel_us"):
                        items.append((-row["wall_us"] / row["kernel_us"], f"{case} {mode} {dt}"))
        worst, note = _worst(items)
        lines.append(
            _line(
                f"{op} host overhead ({providers[0]}, auto's): wall / kernel time, worst case",
                None if worst is None else -worst,
                1.3,
                _ratio,
                higher=False,
                note=note,
            )
        )
    for op in OPS:
        for b in FUSED:
            items = []
            for mode in ("forward", "fwd+bwd"):
                torch_row = R.get("overhead", f"{op}-tiny", "torch", mode, "float32")
                row = R.get("overhead", f"{op}-tiny", b, mode, "float32")
                if torch_row and row:
                    items.append((-(row["wall_us"] - torch_row["wall_us"]), mode))
            worst, note = _worst(items)
            lines.append(
                _line(
                    f"{op} tiny inputs, {b}: wall above PyTorch's op, worst mode",
                    None if worst is None else -worst,
                    30,
                    _us,
                    higher=False,
                    note=note,
                )
            )
    lines += test_lines(tests, quick)
    return lines


def test_lines(tests: dict[str, str], quick: bool) -> list[Line]:
    lines = []
    for dt in TEST_DTYPES:
        lines.append(
            _tests_line(
                f"GPU tests with dtype {dt} (a dtype parameter)", {n: o for n, o in tests.items() if f"torch.{dt}" in n}
            )
        )
    lines.append(_tests_line("every GPU test run (all dtypes, model, training, extension errors)", tests))
    dtypes = TEST_DTYPES + (() if quick else ("float64",))
    cov = coverage(tests, dtypes)
    passed = sum(o in ("PASSED", "collected") for o in cov.values())
    missing = [f"{op}/{b}/{d}" for (op, b, d), o in cov.items() if o not in ("PASSED", "collected")]
    name = f"op x backend x dtype ({'/'.join(dtypes)}) proved by a GPU test"
    if not tests:
        lines.append(Line(name, "-", f"{len(cov)}/{len(cov)}", "not measured"))
    else:
        lines.append(
            Line(
                name,
                f"{passed}/{len(cov)}"
                + (f" (missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})" if missing else ""),
                f"{len(cov)}/{len(cov)}",
                "met" if not missing else "NOT MET",
            )
        )
    return lines


def _tests_line(name, outcomes):
    counts = {k: sum(o == k for o in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "collected")}
    if not outcomes:
        return Line(name, "-", "all pass", "not measured")
    if counts["collected"]:
        return Line(name, f"{counts['collected']} collected", "all pass", "collected")
    bad = counts["FAILED"] + counts["ERROR"]
    text = f"{counts['PASSED']} passed, {bad} failed" + (f", {counts['SKIPPED']} skipped" if counts["SKIPPED"] else "")
    return Line(name, text, "all pass", "met" if not bad and counts["PASSED"] else "NOT MET")


# --- report ------------------------------------------------------------------------------------


def backend_lines(R: Rows, auto_order: dict) -> list[str]:
    """Per op and dtype: fwd+bwd wall time summed over the op's benchmarked shapes, per backend."""
    out = [f"{'op (fwd+bwd, sum over its shapes)':<36} {'dtype':<9} {'cuda':>12} {'triton':>12}  faster  auto picks"]
    for op in OPS:
        for dt in BENCH_DTYPES:
            sums = {}
            for b in FUSED:
                provider = f"mlp-{b}" if op == "mlp_composite" else b
                rows = [R.get(op, c, provider, "fwd+bwd", dt) for c in R.cases(op)]
                rows = [r for r in rows if r and not r.get("baseline")]
                sums[b] = sum(r["wall_us"] for r in rows) if rows else None
            faster = min((b for b in FUSED if sums[b] is not None), key=lambda b: sums[b], default="-")
            auto = auto_order.get(op, "?")
            cells = "".join(f" {sums[b]:10.1f}us" if sums[b] is not None else f" {'-':>12}" for b in FUSED)
            note = "" if faster in ("-", auto) else "  <- measured faster than auto's choice"
            out.append(f"{op:<36} {dt:<9}{cells}  {faster:<7} {auto}{note}")
    return out


def info_lines(R: Rows) -> list[str]:
    out = []
    for (bench, case, provider, _mode, dtype), r in sorted(R.rows.items()):
        if bench == "model":
            out.append(
                f"inference {case:<16} {provider:<10} {dtype:<9} {r['per_s']:9.1f} frames/s "
                f"(wall {r['wall_us'] / 1e3:.1f} ms, host {r['host_us'] / 1e3:.1f} ms per call)"
                if "per_s" in r
                else f"inference {case} {provider} {dtype}: no figure"
            )
        if bench == "train":
            peak = f", peak {r['peak_MB']:.0f} MB" if "peak_MB" in r else ""
            out.append(
                f"training  {case:<16} {provider:<10} {dtype:<9} {r.get('s_per_step', float('nan')):9.3f} s/step "
                f"({r.get('per_s', float('nan')):.1f} samples/s{peak}, {r.get('saved_MB', 0):.0f} MB saved)"
            )
    return out


def auto_choices() -> dict:
    """The backend `auto` tries first on CUDA today, per op (each op's registry entry)."""
    try:
        from fnevr.ops import _registry
    except Exception:
        return {}
    return {op: _registry.auto_order(op, "cuda")[0] for op in _registry.ops()}


def newest_full_bench(dirs, stamp: str) -> Path | None:
    runs = [
        p
        for d in dirs
        for p in Path(d).glob("gpu-bench-*.jsonl")
        if not p.stem.endswith(("-quick", "-dry")) and p.stem != f"gpu-bench-{stamp}"
    ]
    return max(runs, key=lambda p: p.name) if runs else None


def summarize(out: Path, stamp: str, quick: bool, dry: bool, baselines=()) -> tuple[str, dict]:
    baseline_file = newest_full_bench([out, *baselines], stamp) if quick and not dry else None
    R = Rows(load_rows(out / f"gpu-bench-{stamp}.jsonl"), load_rows(baseline_file) if baseline_file else ())
    tests = parse_tests(out / f"gpu-tests-{stamp}.txt")
    auto = auto_choices()
    lines = target_lines(R, tests, quick, auto)
    if dry:  # CPU stand-ins: whether each line was computed is what a dry run shows
        lines = [
            Line(x.name, x.measured, x.target, "dry run" if x.status != "not measured" else x.status) for x in lines
        ]
    width = max(len(x.name) for x in lines)
    kind = (
        "dry run (CPU, tiny shapes, stand-in backends: the figures mean nothing)"
        if dry
        else ("quick" if quick else "full")
    )
    text = [f"fnevr GPU check summary {stamp} ({kind})"]
    stages = out / f"gpu-stages-{stamp}.txt"
    if stages.is_file():
        text.append("stages: " + " | ".join(stages.read_text().split("\n")[:-1]))
    text += ["", f"{'target':<{width}}  {'measured':<42} {'target':<10} status"]
    text += [f"{x.name:<{width}}  {x.measured:<42} {x.target:<10} {x.status}" for x in lines]
    met = sum(x.status == "met" for x in lines)
    text.append(
        f"{met} of {len(lines)} targets met, {sum(x.status == 'NOT MET' for x in lines)} not met, "
        f"{sum(x.status == 'not measured' for x in lines)} not measured"
    )
    if R.used_baseline:
        text.append(f"* baseline (torch.compile, reference) from the full run {baseline_file.name}, not re-timed")
    text += ["", *backend_lines(R, auto), "", *info_lines(R)]
    return "\n".join(text) + "\n", {"stamp": stamp, "kind": kind, "targets": [x.__dict__ for x in lines]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stamp")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument(
        "--baselines",
        type=Path,
        action="append",
        default=[],
        help="with --quick: also look here for the full run's rows (a machine's kept cache)",
    )
    parser.add_argument("--coverage", type=Path, metavar="TESTS_TXT")
    parser.add_argument("--fp64", action="store_true", help="with --coverage: fp64 too")
    args = parser.parse_args(argv)
    if args.coverage:
        cov = coverage(parse_tests(args.coverage), TEST_DTYPES + (("float64",) if args.fp64 else ()))
        missing = sorted("/".join(k) for k, o in cov.items() if o is None)
        print(
            f"op x backend x dtype covered by the selection: {len(cov) - len(missing)}/{len(cov)}"
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
        return 1 if missing else 0
    text, data = summarize(args.out, args.stamp, args.quick, args.dry_run, args.baselines)
    print(text, end="")
    (args.out / f"gpu-summary-{args.stamp}.txt").write_text(text)
    (args.out / f"gpu-summary-{args.stamp}.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
