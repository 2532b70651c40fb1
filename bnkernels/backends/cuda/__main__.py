"""``python -m bnkernels.backends.cuda build | info``: build or inspect the CUDA extension."""

from .launch import main

raise SystemExit(main())
