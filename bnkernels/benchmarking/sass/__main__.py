"""``python -m bnkernels.benchmarking.sass``: the SASS report (``bnkernels bench --sass``)."""
from .report import main

raise SystemExit(main())
