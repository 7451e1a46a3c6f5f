"""Draw PNG charts of speed-up per op, case and provider from benchmark JSON files written by
``python benchmarks/run.py ... --save DIR``.

    python benchmarks/plot.py benchmarks/results/*.json --out benchmarks/results/plots

For each (op, mode, dtype, device) group, every provider's median time is compared with the group's
baseline: PyTorch's own op ("torch") or the eager composition ("eager") where the benchmark has one,
else the eager reference ("reference"), else the unfused ray head ("unfused"), else the published
recipe ("published"). Kernel (device) time is used where it was measured, wall time otherwise.
Needs matplotlib.
"""

import argparse
import json
import os
from collections import defaultdict

BASELINES = ("torch", "eager", "reference", "unfused", "published")


def rows(paths):
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        env = data.get("fnevr_environment", {})
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "median_us" in info and info.get("provider") != "copy":
                yield env, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="benchmark JSON files (run.py --save)")
    parser.add_argument("--out", default="benchmarks/results/plots", help="folder for the PNG files")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for env, r in rows(args.json):
        key = (r["op"], r["dtype"], r["device"], env.get("device", "?"), env.get("date", "")[:10])
        groups[key][(r["mode"], r["provider"])] = r.get("kernel_us", r["median_us"])
    os.makedirs(args.out, exist_ok=True)
    for (op, dtype, device, name, date), times in sorted(groups.items()):
        modes = sorted({m for m, _ in times})
        providers = sorted({p for _, p in times} - set(BASELINES))
        fig, ax = plt.subplots(figsize=(1.2 + 1.4 * len(modes), 3.6))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            speedups = []
            for mode in modes:
                base = next((times[(mode, b)] for b in BASELINES if (mode, b) in times), None)
                t = times.get((mode, provider))
                speedups.append(base / t if base and t else 0.0)
            ax.bar([j + i * width for j in range(len(modes))], speedups, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes, rotation=20, fontsize=8)
        ax.set_ylabel("speed-up over baseline")
        ax.set_title(f"{op} {dtype} on {name} ({date})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(args.out, f"{op}-{dtype}-{device}.png".replace("/", "_"))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
