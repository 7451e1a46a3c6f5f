"""Compile every Triton kernel launch of fnevr's ops for a GPU target, with no GPU, and print
what each compiled kernel needs (registers, spills, shared memory). Needs
FNEVR_TRITON_COMPILE_ONLY=<arch> (e.g. 90); see fnevr.kernels.aot."""

import dataclasses

import torch

from fnevr.ops import ops

from .aot import DTYPES, ENV, compile_op, requested_arch

OPS = tuple(ops())


def main(argv=None) -> int:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(prog="python -m fnevr.kernels", description=__doc__)
    parser.add_argument("ops", nargs="*", metavar="OP", help=f"ops to compile: {', '.join(OPS)} (default: all)")
    parser.add_argument(
        "--dtype", action="append", choices=["float32", "float16", "bfloat16"], help="dtypes (default: all three)"
    )
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if requested_arch() is None:
        parser.error(f"set {ENV} (e.g. {ENV}=90) before running this")
    for op in args.ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}: choose from {', '.join(OPS)}")

    dtypes = [getattr(torch, n) for n in args.dtype] if args.dtype else DTYPES
    report = {}
    for op in args.ops or OPS:
        start = time.perf_counter()
        kernels = compile_op(op, dtypes)
        print(
            f"{op}: {len(kernels)} kernels for sm_{requested_arch()} in {time.perf_counter() - start:.1f} s", flush=True
        )
        for k in kernels:
            print("  " + k.row(), flush=True)
        report[op] = [
            dataclasses.asdict(k) | {"constants": {a: str(v) for a, v in k.constants.items()}} for k in kernels
        ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
