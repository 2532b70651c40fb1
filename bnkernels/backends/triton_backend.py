"""The Triton backend object. Kernels load lazily (bnkernels imports without triton)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from ._base import FLOAT_DTYPES, Backend, _family

_COMMON = "bnkernels.backends.triton.common"


class TritonBackend(Backend):
    name = "triton"

    def interpreting(self) -> bool:
        """True when the kernels run (or, once loaded, will run) in the Triton interpreter."""
        common = sys.modules.get(_COMMON)
        if common is not None:
            return common.INTERPRET
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def unavailable_reasons(self):
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed"]
        import torch

        if not torch.cuda.is_available() and not self.interpreting():
            return ["no CUDA device, and the Triton interpreter is off "
                    "(set TRITON_INTERPRET=1 before bnkernels' kernels are first loaded)"]
        return []

    def not_supported_reasons(self, op, x, **inputs):
        reasons = []
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        if x.device.type == "cpu" and not self.interpreting():
            reasons.append("x is a CPU tensor; Triton kernels run on CPU only under the "
                           "interpreter (TRITON_INTERPRET=1 set before they are first loaded)")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"device type {x.device.type!r} is not supported")
        return reasons

    def noisy_batch_norm_noise(self, x, noise):
        return importlib.import_module("bnkernels.backends.triton.noise").noisy_batch_norm_noise(
            x, noise)

    def __getattr__(self, name):
        """``<family>_<stage>`` (e.g. ``batch_norm_fwd``) comes from
        ``bnkernels.backends.triton.<family>`` (imported on first use, so the kernels are
        defined only when needed)."""
        family = _family(name)
        module = importlib.import_module(f"bnkernels.backends.triton.{family}")
        return getattr(module, name)
