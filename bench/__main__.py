"""``python -m bench [--quick] [scenario ...]``: run the side-by-side benchmarks, print markdown tables."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Scenario modules in bench/, run in this order when none is named.
SCENARIOS = ("core", "scaling", "fsdp", "deepspeed", "fairscale")
#: Also runnable by name: the CUDA tables of ``core`` alone.
NAMED_ONLY = ("gpu",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS),
                        help=f"any of {', '.join(SCENARIOS + NAMED_ONLY)} (default: {' '.join(SCENARIOS)})")
    args = parser.parse_args(argv)
    known = SCENARIOS + NAMED_ONLY
    for name in args.scenarios:  # (not choices=: argparse checks a nargs="*" default list against them whole)
        if name not in known:
            parser.error(f"argument scenarios: invalid choice: {name!r} (choose from {', '.join(map(repr, known))})")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .common import CheckFailed

    failed = []
    for name in args.scenarios:
        module = importlib.import_module(f"bench.{name}")
        print(f"## {name}\n")
        try:
            print(module.main(quick=args.quick))
        except CheckFailed as e:  # print the tables, then say which rows missed; the other scenarios still run
            print(e.output)
            print(f"\n{e}", file=sys.stderr)
            failed.append(name)
        print(flush=True)
    if failed:
        print(f"dist_clip's norms or clipped gradients missed the float64 reference in: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
