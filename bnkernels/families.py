"""The op families bnkernels ships, one descriptor each, and :func:`register` for new ones.

A descriptor (:class:`~.backends.family.Family`) is the single place that names a family's
plans per backend, its running buffers and saved state, its traced route (the registered
torch ops) and its double backward; every layer dispatches through it. Adding a family with
kernels is a folder per backend (``backends/triton/<name>/``: ``kernels.py``, ``plan.py``)
and one descriptor here (see docs/adding-an-op.md).

A family defined outside the package (reference formulas only, say) registers with
:func:`register`: it then has the functional op (:func:`bnkernels.functional.norm`), the
modules (:class:`bnkernels.nn.FamilyNorm`), autograd, torch.compile through its registered
ops (``bnkernels::<name>``, made here) and its double backward, or a clear error if it
declines one.
"""

from __future__ import annotations

from . import double_backward
from .backends import family as _family
from .backends.family import FAMILIES, BenchOp, Family, UnknownOpError, family_of
from .backends.reference import BatchNormPlan as _RefBatchNorm
from .backends.reference import LpNormPlan as _RefLpNorm
from .library import BatchNormOpPlan, LpNormOpPlan, register_family_ops


def _builtin(name, reference, plan_class, running, saved, op_plan, grads, doc, bench):
    """A family with plans on the reference, Triton (``backends/triton/<name>/plan.py``), CUDA
    (``backends/cuda/plans.py``) and cpu (``backends/cpu``) backends."""
    return Family(name=name, plans={
        "reference": reference,
        "triton": f"bnkernels.backends.triton.{name}.plan:{plan_class}",
        "cuda": f"bnkernels.backends.cuda.plans:{plan_class}",
        "cpu": f"bnkernels.backends.cpu:{name}_plan",
    }, running=running, saved=saved, op_plan=op_plan, grads=grads, doc=doc, bench=bench)


_BENCH = "bnkernels.benchmarking.providers:"  # the benchmarks' makers of the built-in ops


# BatchNorm, noisy BatchNorm included (a noisy call's signature carries its noise).
BATCH_NORM = _builtin(
    "batch_norm", _RefBatchNorm, "BatchNormPlan", ("running_mean", "running_var"),
    ("mean", "invstd"), BatchNormOpPlan, double_backward.batch_norm_family_grads,
    "BatchNorm and noisy BatchNorm: act(s * (w * (x - mean) / sqrt(var + eps) + b) + m)",
    {"batch_norm": BenchOp(_BENCH + "bnkernels_batch_norm", None, _BENCH + "batch_norm_oracle"),
     "noisy_batch_norm": BenchOp(_BENCH + "bnkernels_noisy_batch_norm",
                                 _BENCH + "noisy_batch_norm_eager_of")})

LP_NORM = _builtin(
    "lp_norm", _RefLpNorm, "LpNormPlan", ("running_mean", "running_scale"), ("mean", "scale"),
    LpNormOpPlan, double_backward.lp_norm_family_grads,
    "l_p normalization: w * (x - mean) / (s_p + eps) + b",
    {"lp_norm": BenchOp(_BENCH + "bnkernels_lp_norm", _BENCH + "lp_norm_eager_of",
                        _BENCH + "lp_norm_oracle")})


def register(family: Family, replace: bool = False) -> Family:
    """Register a new op family. A family with no ``op_plan`` gets registered torch ops
    (``bnkernels::<name>``, ``bnkernels::<name>_backward``; calls whose only flag is
    ``training``) and their traced-route plan."""
    if family.op_plan is None:
        family.op_plan = register_family_ops(family.name)
    return _family.register(family, replace)


for _f in (BATCH_NORM, LP_NORM):
    _family.register(_f)

__all__ = ["BATCH_NORM", "FAMILIES", "BenchOp", "Family", "LP_NORM", "UnknownOpError", "family_of",
           "register"]
