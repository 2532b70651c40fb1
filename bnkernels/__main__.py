"""Command line: ``bnkernels <subcommand>`` (also ``python -m bnkernels``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN with bnkernels BatchNorm and with "
                                       "torch's, side by side, and report how they match")
    demo.add_argument("--steps", type=int, default=20, help="SGD steps")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(steps=args.steps, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
