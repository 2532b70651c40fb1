"""The CUDA C++ backend object. The extension loads (or builds) lazily, on the first kernel
call: importing bnkernels never compiles anything, and "auto" selection only considers this
backend once the extension is built (see :func:`bnkernels.backends._auto_order`)."""

from __future__ import annotations

import importlib

import torch

from ._base import FLOAT_DTYPES, Backend, _family

_MODULE = "bnkernels.backends.cuda"


class CudaBackend(Backend):
    name = "cuda"

    def _module(self):
        return importlib.import_module(_MODULE)

    def unavailable_reasons(self):
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"this torch ({torch.__version__}) is not a CUDA build")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons + self._module().extension_reasons()

    def is_built(self) -> bool:
        """The extension loads without compiling (prebuilt, JIT-cached, or already loaded)."""
        return self._module().is_built()

    def not_supported_reasons(self, op, x, **inputs):
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors; x is on {x.device.type}")
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        return reasons

    def __getattr__(self, name):
        """``<family>_<stage>`` (e.g. ``batch_norm_fwd``) and ``noisy_batch_norm_noise`` come
        from :mod:`bnkernels.backends.cuda` (imported on first use)."""
        if name != "noisy_batch_norm_noise":
            _family(name)  # AttributeError for anything that is not an entry point
        return getattr(self._module(), name)
