"""``python -m bench [--quick] [scenario ...]``: run the side-by-side benchmarks, print markdown tables."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Scenario modules in bench/, run in this order when none is named.
SCENARIOS = ("core", "scaling", "fsdp", "deepspeed", "fairscale")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in args.scenarios:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                print(f"## {name}\n\n(not available yet)\n")
                continue
            raise
        print(f"## {name}\n")
        print(module.main(quick=args.quick))
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
