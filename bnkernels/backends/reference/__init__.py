"""The eager PyTorch backend: the correctness oracle of every kernel (the CPU path for real work
is the cpu backend; "auto" falls back to this one where the cpu backend cannot be built).

The formulas live in :mod:`.formulas` (re-exported here); this module holds the backend object
and its plans, which only bind the call's flags (there is nothing to launch-plan in eager
PyTorch).
"""

from __future__ import annotations

import torch

from ..family import family_of
from ..plan import FLOAT_DTYPES, BasePlan, acc_dtype
from . import formulas as F
from .formulas import *  # noqa: F401,F403  (the formulas, as bnkernels.backends.reference.*)


def _step_used(noise):
    """The step a noisy forward used, snapshotted for its backward (a tensor step may advance
    before the backward runs); None for an int step or plain BatchNorm."""
    if noise is not None and isinstance(noise[2], torch.Tensor):
        return noise[2].reshape(1).to(torch.int64, copy=True)
    return None


class BatchNormPlan(BasePlan):
    """BatchNorm (and noisy BatchNorm) of one signature: :class:`~..plan.Plan` and
    :class:`~..plan.SyncStages` on the reference formulas."""

    def __init__(self, sig):
        self.sig = sig
        self.training = sig.training
        self.activation = sig.activation

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        running_mean, running_var, _, momentum, eps, noise, counter = call
        if counter is not None:
            counter.add_(1)
        y, mean, invstd = F.batch_norm_reference_fwd(
            x, running_mean, running_var, weight, bias, self.training, momentum, eps,
            self.activation, noise, residual)
        if not self.training:
            if not need_saved:
                return y, None, None, None
            acc = acc_dtype(x.dtype)  # snapshots: the backward of this forward's statistics
            return (y, running_mean.to(acc, copy=True),
                    1.0 / torch.sqrt(running_var.to(acc) + eps), None)
        return y, mean, invstd, _step_used(noise)

    def backward(self, dy, x, weight, bias, saved, needs):
        mean, invstd, _, noise, out = saved
        if not self.sig.has_residual:
            return F.batch_norm_reference_bwd(dy, x, mean, invstd, weight, bias, self.training,
                                              self.activation, needs, noise)
        g = F.residual_grad(dy, out, self.activation)  # d(residual), and what reaches bn(x)
        dx, dw, db = F.batch_norm_reference_bwd(g, x, mean, invstd, weight, bias,
                                                self.training, None, needs[:3], noise)
        return dx, dw, db, (g if needs[3] else None)

    # SyncBatchNorm's stages

    def stats(self, x):
        return F.batch_norm_reference_stats(x)

    def apply(self, x, mean, invstd, weight, bias, noise):
        return F.batch_norm_reference_apply(x, mean, invstd, weight, bias, self.activation,
                                            noise)

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise):
        return F.batch_norm_reference_bwd_reduce(dy, x, mean, invstd, weight, bias,
                                                 self.activation, noise)

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise):
        return F.batch_norm_reference_bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums,
                                             self.activation, noise)


class LpNormPlan(BasePlan):
    """l_p normalization of one signature (saved: mean and s_p in training; in eval, as every
    backend, snapshots of running_mean and 1/(running_scale + eps), and BatchNorm's eval
    backward)."""

    def __init__(self, sig):
        self.sig = sig
        self.training = sig.training
        self.p = sig.p
        self.centered = sig.centered

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_scale, _, momentum, eps, _, counter = call
        if counter is not None:
            counter.add_(1)
        y, mean, scale = F.lp_norm_reference_fwd(
            x, self.p, running_mean, running_scale, weight, bias, self.training, momentum, eps,
            self.centered)
        if not self.training:
            if not need_saved:
                return y, None, None, None
            acc = acc_dtype(x.dtype)
            return (y, running_mean.to(acc, copy=True),
                    1.0 / (running_scale.to(acc) + eps), None)
        return y, mean, scale, None

    def backward(self, dy, x, weight, bias, saved, needs):
        a, b, eps = saved[0], saved[1], saved[2]
        if not self.training:  # constant statistics: BatchNorm's eval backward, invstd = b
            return F.batch_norm_reference_bwd(dy, x, a, b, weight, bias, False, None, needs)
        return F.lp_norm_reference_bwd(dy, x, self.p, a, b, weight, bias, self.training,
                                       self.centered, eps, needs)


class ReferenceBackend:
    name = "reference"

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, op, x) -> list[str]:
        if x.dtype not in FLOAT_DTYPES:
            return [f"dtype {x.dtype} is not supported"]
        return []

    def plan(self, sig):
        """The plan of ``sig``: its op family's reference plan."""
        return family_of(sig.op).make_plan(self.name, sig)

    def noise(self, x, noise):
        return F.noisy_bn_noise_reference(x, noise)
