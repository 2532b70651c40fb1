"""The eager PyTorch backend: the correctness oracle of every kernel, and the CPU path.

The formulas live in :mod:`.ops` (re-exported here); this module holds the backend object and
its plans, which only bind the call's flags (there is nothing to launch-plan in eager PyTorch).
"""

from __future__ import annotations

import torch

from .._base import FLOAT_DTYPES, Backend
from . import ops
from .ops import *  # noqa: F401,F403  (the formulas, as bnkernels.backends.reference.*)
from .ops import acc_dtype, noisy_bn_noise_reference


def _step_used(noise):
    """The step a noisy forward used, snapshotted for its backward (a tensor step may advance
    before the backward runs); None for an int step or plain BatchNorm."""
    if noise is not None and isinstance(noise[2], torch.Tensor):
        return noise[2].reshape(1).to(torch.int64, copy=True)
    return None


class BatchNormPlan:
    """Forward/backward of one signature (see :class:`bnkernels.backends._base.Backend`)."""

    def __init__(self, sig):
        self.training = sig.training
        self.activation = sig.activation

    def forward(self, x, running_mean, running_var, weight, bias, momentum, eps, noise,
                need_saved=True):
        y, mean, invstd = ops.batch_norm_reference_fwd(
            x, running_mean, running_var, weight, bias, self.training, momentum, eps,
            self.activation, noise)
        if not self.training:
            if not need_saved:
                return y, None, None, None
            acc = acc_dtype(x.dtype)  # snapshots: the backward of this forward's statistics
            return (y, running_mean.to(acc, copy=True),
                    1.0 / torch.sqrt(running_var.to(acc) + eps), None)
        return y, mean, invstd, _step_used(noise)

    def backward(self, dy, x, mean, invstd, weight, bias, eps, needs, noise):
        return ops.batch_norm_reference_bwd(dy, x, mean, invstd, weight, bias, self.training,
                                            self.activation, needs, noise)


class LpNormPlan:
    """Forward/backward of one l_p signature (saved: mean and s_p, or the running buffers)."""

    def __init__(self, sig):
        self.training = sig.training
        self.p = sig.p
        self.centered = sig.centered

    def forward(self, x, running_mean, running_scale, weight, bias, momentum, eps, noise=None,
                need_saved=True):
        y, mean, scale = ops.lp_norm_reference_fwd(
            x, self.p, running_mean, running_scale, weight, bias, self.training, momentum, eps,
            self.centered)
        if not self.training:
            if not need_saved:
                return y, None, None, None
            acc = acc_dtype(x.dtype)
            return y, running_mean.to(acc, copy=True), running_scale.to(acc, copy=True), None
        return y, mean, scale, None

    def backward(self, dy, x, a, b, weight, bias, eps, needs, noise=None):
        return ops.lp_norm_reference_bwd(dy, x, self.p, a, b, weight, bias, self.training,
                                         self.centered, eps, needs)


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, op, x, **inputs):
        if x.dtype not in FLOAT_DTYPES:
            return [f"dtype {x.dtype} is not supported"]
        return []

    def batch_norm_plan(self, sig):
        return BatchNormPlan(sig)

    def lp_norm_plan(self, sig):
        return LpNormPlan(sig)

    def noisy_batch_norm_noise(self, x, noise):
        return noisy_bn_noise_reference(x, noise)

    # Entry points, under the names every backend uses.
    def batch_norm_fwd(self, *args, **kwargs):
        return ops.batch_norm_reference_fwd(*args, **kwargs)

    def batch_norm_bwd(self, *args, **kwargs):
        return ops.batch_norm_reference_bwd(*args, **kwargs)

    def batch_norm_stats(self, *args, **kwargs):
        return ops.batch_norm_reference_stats(*args, **kwargs)

    def batch_norm_apply(self, *args, **kwargs):
        return ops.batch_norm_reference_apply(*args, **kwargs)

    def batch_norm_bwd_reduce(self, *args, **kwargs):
        return ops.batch_norm_reference_bwd_reduce(*args, **kwargs)

    def batch_norm_bwd_dx(self, *args, **kwargs):
        return ops.batch_norm_reference_bwd_dx(*args, **kwargs)

    def lp_norm_fwd(self, *args, **kwargs):
        return ops.lp_norm_reference_fwd(*args, **kwargs)

    def lp_norm_bwd(self, *args, **kwargs):
        return ops.lp_norm_reference_bwd(*args, **kwargs)
