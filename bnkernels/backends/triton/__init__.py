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

from ..family import family_of
from ..plan import FLOAT_DTYPES

_COMMON = f"{__name__}.common"


def interpreter_mismatch() -> str | None:
    """Why Triton's own @triton.jit functions (tl.sum, tl.zeros, ...) cannot run with
    bnkernels' kernels as they would load now, or None. They are built for the compiler or for
    the interpreter when triton is first imported, so TRITON_INTERPRET set (or unset) after
    that fails inside the first kernel with "Cannot call @triton.jit'd outside of the scope of
    a kernel"."""
    tl = sys.modules.get("triton.language")
    fn = getattr(getattr(tl, "standard", None), "sum", None)
    if fn is None:
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    common = sys.modules.get(_COMMON)
    want = (common.INTERPRET if common is not None
            else os.environ.get("TRITON_INTERPRET", "0") == "1")
    if want == isinstance(fn, InterpretedFunction):
        return None
    if want:
        return ("TRITON_INTERPRET=1 was set after triton was imported (importing bnkernels "
                "imports it), so Triton's own functions are built for the compiler and the "
                "interpreter cannot run the kernels: set TRITON_INTERPRET=1 before the process "
                "starts (TRITON_INTERPRET=1 python ...), or use the reference backend on the CPU")
    return ("TRITON_INTERPRET was unset after triton was imported with it: Triton's own "
            "functions run only in the interpreter; unset it before the process starts")


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
        mismatch = interpreter_mismatch()
        return [mismatch] if mismatch else []

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
        """The plan of ``sig``: its op family's Triton plan (raises for an op no family
        names, or a family with no Triton plan)."""
        return family_of(sig.op).make_plan(self.name, sig)

    def noise(self, x, noise):
        from .noise import noisy_batch_norm_noise

        return noisy_batch_norm_noise(x, noise)
