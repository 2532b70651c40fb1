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
from .backends.family import FAMILIES, Family, UnknownOpError, family_of
from .backends.reference import BatchNormPlan as _RefBatchNorm
from .backends.reference import LpNormPlan as _RefLpNorm
from .library import BatchNormOpPlan, LpNormOpPlan, register_family_ops

BATCH_NORM = Family(
    name="batch_norm",  # noisy BatchNorm included: a noisy call's signature has its noise
    plans={
        "reference": _RefBatchNorm,
        "triton": "bnkernels.backends.triton.batch_norm.plan:BatchNormPlan",
        "cuda": "bnkernels.backends.cuda.plans:BatchNormPlan",
    },
    running=("running_mean", "running_var"),
    saved=("mean", "invstd"),
    op_plan=BatchNormOpPlan,
    grads=double_backward.batch_norm_family_grads,
    doc="BatchNorm and noisy BatchNorm: act(s * (w * (x - mean) / sqrt(var + eps) + b) + m)",
)

LP_NORM = Family(
    name="lp_norm",
    plans={
        "reference": _RefLpNorm,
        "triton": "bnkernels.backends.triton.lp_norm.plan:LpNormPlan",
        "cuda": "bnkernels.backends.cuda.plans:LpNormPlan",
    },
    running=("running_mean", "running_scale"),
    saved=("mean", "scale"),
    op_plan=LpNormOpPlan,
    grads=double_backward.lp_norm_family_grads,
    doc="l_p normalization: w * (x - mean) / (s_p + eps) + b",
)


def register(family: Family, replace: bool = False) -> Family:
    """Register a new op family. A family with no ``op_plan`` gets registered torch ops
    (``bnkernels::<name>``, ``bnkernels::<name>_backward``; calls whose only flag is
    ``training``) and their traced-route plan."""
    if family.op_plan is None:
        family.op_plan = register_family_ops(family.name)
    return _family.register(family, replace)


for _f in (BATCH_NORM, LP_NORM):
    _family.register(_f)

__all__ = ["BATCH_NORM", "FAMILIES", "Family", "LP_NORM", "UnknownOpError", "family_of",
           "register"]
