"""``bnkernels`` / ``python -m bnkernels``: the command line is :mod:`bnkernels.cli`."""
from .cli import main  # noqa: F401

if __name__ == "__main__": raise SystemExit(main())  # noqa: E701
