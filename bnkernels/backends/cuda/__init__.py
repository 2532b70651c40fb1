"""The CUDA C++ backend: the ``csrc/`` extension, its loader and thin launchers.

* ``build_config.py``: how the extension is built (sources, flags, architectures, cache); also
  loaded by path from ``setup.py``.
* ``launch.py``: loading (prebuilt, JIT-cached, or built on first use) and the launchers.
* ``python -m bnkernels.backends.cuda build | info`` (``__main__.py``).

The extension loads (or builds) lazily, on the first kernel call: importing bnkernels never
compiles anything, and "auto" selection only considers this backend once the extension is
built (see :func:`bnkernels.backends._auto_order`).
"""

from __future__ import annotations

import torch

from .._base import FLOAT_DTYPES, Backend
from . import launch
from .launch import (  # noqa: F401  (the module's public functions, as bnkernels.backends.cuda.*)
    batch_norm_apply,
    batch_norm_bwd,
    batch_norm_bwd_dx,
    batch_norm_bwd_reduce,
    batch_norm_fwd,
    batch_norm_stats,
    build,
    build_reasons,
    extension_reasons,
    is_built,
    library_path,
    load,
    lp_norm_bwd,
    lp_norm_fwd,
    main,
    noisy_batch_norm_noise,
    override_config,
    persistent_plan,
)

_ENTRY_POINTS = ("batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_apply",
                 "batch_norm_bwd_reduce", "batch_norm_bwd_dx", "noisy_batch_norm_noise",
                 "lp_norm_fwd", "lp_norm_bwd")


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reasons(self):
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"this torch ({torch.__version__}) is not a CUDA build")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons + launch.extension_reasons()

    def is_built(self) -> bool:
        """The extension loads without compiling (prebuilt, JIT-cached, or already loaded)."""
        return launch.is_built()

    def not_supported_reasons(self, op, x, **inputs):
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors; x is on {x.device.type}")
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        return reasons

    def batch_norm_plan(self, sig):
        return launch.BatchNormPlan(sig)

    def lp_norm_plan(self, sig):
        return launch.LpNormPlan(sig)

    def __getattr__(self, name):
        """The entry points (``batch_norm_fwd``, ...) of :mod:`.launch`."""
        if name not in _ENTRY_POINTS:
            raise AttributeError(name)
        return getattr(launch, name)
