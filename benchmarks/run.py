"""Run fnevr's benchmarks and print their table; with --save DIR also write the pytest-benchmark
JSON and the printed output there, with the device, versions, commit and date.

    python benchmarks/run.py                     # every registered op (make bench), on the GPU if there is one
    python benchmarks/run.py grid_sample         # grid sampling
    python benchmarks/run.py spade_norm          # SPADE normalisation at the decoder's shapes
    python benchmarks/run.py mlp_composite       # the ray head: unfused, fused head, fused MLP
    python benchmarks/run.py overhead model train  # call overhead, the whole model, a training step
    python benchmarks/run.py composite grid_sample --save benchmarks/results

Each registered op (fnevr/ops/_registry.py) has its benchmarks/bench_<op>.py.
"""

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch

import fnevr

HERE = os.path.dirname(os.path.abspath(__file__))


def environment() -> dict:
    commit = os.environ.get("FNEVR_COMMIT")  # for copies of the tree without .git (device runs)
    if not commit:
        try:
            commit = (
                subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
                ).stdout.strip()
                or "unknown"
            )
        except OSError:
            commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = list(fnevr.ops.ops())
    parser.add_argument(
        "benchmarks",
        nargs="*",
        default=ops,
        help=f"which bench_*.py to run: the ops ({', '.join(ops)}; all by default), or overhead, model, train",
    )
    parser.add_argument("--save", metavar="DIR", help="write <name>-<device>-<date>.json and .txt here")
    args, extra = parser.parse_known_args()
    env = environment()
    files = [os.path.join(HERE, f"bench_{name}.py") for name in args.benchmarks]
    argv = (
        files
        + [
            "-p",
            "no:cacheprovider",
            "--benchmark-enable",
            "--benchmark-columns=median,rounds",
            "-o",
            "python_files=bench_*.py",
            "--rootdir",
            HERE,
        ]
        + extra
    )
    stem = None
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        tag = "cuda-" + env["device"].replace(" ", "_") if env["cuda"] else "cpu"
        stem = os.path.join(args.save, f"{'+'.join(args.benchmarks)}-{tag}-{env['date'][:10]}")
        argv.append(f"--benchmark-json={stem}.json")
    header = "fnevr benchmarks: " + json.dumps(env)
    print(header, flush=True)
    if not stem:
        return pytest.main(argv)
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buf.write(s)
            return len(s)

    with redirect_stdout(Tee()):
        code = pytest.main(argv)
    with open(stem + ".txt", "w") as f:
        f.write(header + "\n" + buf.getvalue())
    with open(stem + ".json") as f:
        data = json.load(f)
    data["fnevr_environment"] = env
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
