"""The registry from the shell (for scripts that cannot import it, e.g. benchmarks/gpu_check.sh):

python -m fnevr.ops list [--sep ,]    # the registered ops' names
python -m fnevr.ops backends          # every backend's status, per device type, and auto's order
"""

import argparse

from . import _registry


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fnevr.ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["list", "backends"])
    parser.add_argument("--sep", default="\n", help="separator for `list` (default: one name a line)")
    args = parser.parse_args()
    if args.what == "list":
        print(args.sep.join(_registry.ops()))
        return
    for kind in _registry.DEVICE_TYPES:
        for name, status in _registry.backends(kind).items():
            print(f"{kind:5} {name:10} {status}")
        for op in _registry.ops():
            print(f"{kind:5} auto for {op}: {' > '.join(_registry.auto_order(op, kind))}")
            if rule := _registry.ops()[op].pytorch_when.get(kind):
                print(f"{kind:5}   except PyTorch's op {rule[1]}")


if __name__ == "__main__":
    main()
