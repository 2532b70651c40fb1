"""The CUDA C++ backend: the ``csrc/`` extension and the plans that call it.

* ``build_config.py``: how the extension is built (sources, flags, architectures, cache); also
  loaded by path from ``setup.py``.
* ``loader.py``: loading (prebuilt, JIT-cached, or built on first use).
* ``plans.py``: one signature's calls into the extension.
* ``python -m bnkernels.backends.cuda build | info`` (``__main__.py``).

The extension loads (or builds) lazily, when the first plan is made: importing bnkernels never
compiles anything, and "auto" selection only considers this backend once the extension is
built (see :func:`bnkernels.backends._auto_order`).
"""

from __future__ import annotations

import torch

from ..family import family_of
from ..plan import FLOAT_DTYPES
from . import loader


class CudaBackend:
    name = "cuda"

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"this torch ({torch.__version__}) is not a CUDA build")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons + loader.extension_reasons()

    def is_built(self) -> bool:
        """The extension loads without compiling (prebuilt, JIT-cached, or already loaded)."""
        return loader.is_built()

    def not_supported_reasons(self, op, x) -> list[str]:
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors; x is on {x.device.type}")
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        return reasons

    def plan(self, sig):
        """The plan of ``sig``: its op family's CUDA plan."""
        return family_of(sig.op).make_plan(self.name, sig)

    def noise(self, x, noise):
        from . import plans

        return plans.noise_of(x, noise)
