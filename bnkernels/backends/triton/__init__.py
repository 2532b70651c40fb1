"""The Triton backend: one folder per op family (``batch_norm/``, ``lp_norm/``: ``kernels.py``
with the @triton.jit kernels, ``plan.py`` with one signature's launches), the noise
(``noise.py``), shared layouts and launch heuristics (``common.py``) and pre-bound launches
(``launch.py``).

Importing this package defines no kernel: the kernel modules load when the first plan is
made, because ``@triton.jit`` decides between the compiler and the interpreter when a kernel
is defined, so ``TRITON_INTERPRET=1`` must be set before that to run them on the CPU.
bnkernels imports without triton installed; the backend then reports why it cannot run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ..plan import FLOAT_DTYPES

_COMMON = f"{__name__}.common"


class TritonBackend:
    name = "triton"

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"

    def interpreting(self) -> bool:
        """True when the kernels run (or, once loaded, will run) in the Triton interpreter."""
        common = sys.modules.get(_COMMON)
        if common is not None:
            return common.INTERPRET
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def unavailable_reasons(self) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed"]
        import torch

        if not torch.cuda.is_available() and not self.interpreting():
            return ["no CUDA device, and the Triton interpreter is off "
                    "(set TRITON_INTERPRET=1 before bnkernels' kernels are first loaded)"]
        return []

    def not_supported_reasons(self, op, x) -> list[str]:
        reasons = []
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        if x.device.type == "cpu" and not self.interpreting():
            reasons.append("x is a CPU tensor; Triton kernels run on CPU only under the "
                           "interpreter (TRITON_INTERPRET=1 set before they are first loaded)")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"device type {x.device.type!r} is not supported")
        return reasons

    def plan(self, sig):
        if sig.op == "lp_norm":
            from .lp_norm.plan import LpNormPlan

            return LpNormPlan(sig)
        from .batch_norm.plan import BatchNormPlan

        return BatchNormPlan(sig)

    def noise(self, x, noise):
        from .noise import noisy_batch_norm_noise

        return noisy_batch_norm_noise(x, noise)
