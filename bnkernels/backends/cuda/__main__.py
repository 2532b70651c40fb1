"""``python -m bnkernels.backends.cuda build | info``: build or inspect the CUDA extension."""

from __future__ import annotations

import argparse
import sys

from . import build_config as cuda_build
from .loader import _toolkit_problem, build, library_complete, library_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnkernels.backends.cuda",
        description="Build or inspect bnkernels' CUDA extension (csrc/).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="JIT-compile the extension (needs nvcc and ninja, not a "
                                     "GPU) and print the path of the shared library")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    sub.add_parser("info", help="where the extension is cached and whether it can run here")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            path = build(verbose=args.verbose)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        print(path)
        return 0
    print(f"sources:      {cuda_build.CSRC} (hash {cuda_build.source_hash()})"
          if cuda_build.have_sources() else f"sources:      not found at {cuda_build.CSRC}")
    print(f"archs:        {cuda_build.arch_list()}")
    state = "built" if library_complete() else "absent or incomplete"
    print(f"library:      {library_path()} ({state})")
    print(f"toolkit:      {_toolkit_problem() or 'ok'}")
    from . import CudaBackend

    reasons = CudaBackend().unavailable_reasons()
    print("cuda backend: " + ("available" if not reasons else "unavailable:\n  " +
                              "\n  ".join(reasons)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
