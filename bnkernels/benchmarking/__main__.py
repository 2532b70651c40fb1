"""``python -m bnkernels.benchmarking``: ``bnkernels bench`` without the package CLI."""
from .cli import standalone

raise SystemExit(standalone())
