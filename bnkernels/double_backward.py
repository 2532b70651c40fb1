"""Second derivatives: each op's backward written as differentiable torch ops.

The kernels' backward is a function of (dy, x, weight, bias) that autograd cannot see into.
When a graph of the gradient is wanted (``torch.autograd.grad(..., create_graph=True)``,
``backward(create_graph=True)``, ``gradgradcheck``: autograd then runs the backward with grad
mode on), the autograd Functions of :mod:`bnkernels.autograd` call these functions instead of
the kernels: the reference backend's backward formulas (:mod:`~.backends.reference.formulas`),
in the accumulation dtype, with the batch statistics recomputed from x so that they depend on x.
Their value is the kernels' first derivative (up to rounding) and autograd differentiates them
for the second: d(dx)/dx, d(dx)/dweight, d(dweight)/dx, d(dx)/d(dy), ... all exact.

* BatchNorm (fused ReLU or not): training recomputes mean and invstd = 1/sqrt(var + eps) from
  x; eval takes the statistics the forward saved (running statistics are constants).
* Noisy BatchNorm: the same, with the noise regenerated from its key (it does not depend on x).
* l_p: training recomputes the mean and s_p (l_inf through torch.amax, whose gradient splits a
  tie equally, as the kernels' rule); eval is BatchNorm's with the saved mean and
  1/(running_scale + eps).
* SyncBatchNorm across processes has no second derivative here: :func:`no_double_backward`
  says so (its statistics come from all processes, which a local recomputation cannot see).

Only the create_graph path runs this (a training step's backward never does), so its cost --
eager torch ops, a few passes over x -- is paid only by who asks for second derivatives.
"""

from __future__ import annotations

import torch

from .backends.family import family_of
from .backends.reference import formulas as R


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _chan(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


_KEEP = object()


def grads(plan, dy, x, weight, bias, saved, needs, activation=_KEEP):
    """(dx, dweight, dbias) of the call ``plan`` ran (None where ``needs`` says so),
    differentiable in dy, x, weight and bias: the op family's ``grads`` (its descriptor), or
    the error of a family that declines. ``saved``: what the forward kept (a
    :class:`~.backends.plan.Saved`, or the plain tuple of its fields). ``activation``: the
    call's unless given (None for a residual call, whose dy arrives masked by
    :func:`residual_grad`)."""
    flags = getattr(plan, "sig", plan)  # a backend's plan: its Signature; an OpPlan: itself
    family = family_of(flags.op)
    if family.grads is None:
        raise no_double_backward(family.label or family.name, family.no_grads, family.instead)
    if activation is _KEEP:
        return family.grads(flags, dy, x, weight, bias, saved, needs)
    return family.grads(flags, dy, x, weight, bias, saved, needs, activation=activation)


def _eval_grads(dy, x, weight, bias, saved, needs, activation):
    """Every built-in family in eval: out = act(w * (x - mean) * inv + b), mean and inv the
    constants the forward saved (the mean and 1/sqrt(var + eps), or 1/(s_p + eps) for l_p)."""
    return R.batch_norm_reference_bwd(dy, x, saved[0].detach(), saved[1].detach(), weight,
                                      bias, False, activation, needs, saved[3])


def batch_norm_family_grads(flags, dy, x, weight, bias, saved, needs, activation=_KEEP):
    """BatchNorm's (and noisy BatchNorm's) descriptor ``grads``."""
    if activation is _KEEP:
        activation = flags.activation
    if not flags.training:
        return _eval_grads(dy, x, weight, bias, saved, needs, activation)
    return batch_norm_grads(dy, x, weight, bias, activation, saved[2], needs, saved[3])


def lp_norm_family_grads(flags, dy, x, weight, bias, saved, needs, activation=None):
    """l_p normalization's descriptor ``grads`` (no activation)."""
    if not flags.training:
        return _eval_grads(dy, x, weight, bias, saved, needs, None)
    return lp_norm_grads(dy, x, flags.p, weight, bias, flags.centered, saved[2], needs)


def residual_grad(dy, out, activation):
    """d(residual) of out = act(bn(x) + residual), differentiable in dy: dy masked where the
    fused ReLU's output is <= 0 (the mask a constant, as in torch's ReLU double backward)."""
    return R.residual_grad(dy, out, activation)


def batch_norm_grads(dy, x, weight, bias, activation, eps, needs, noise=None):
    """Training BatchNorm's (dx, dweight, dbias), the batch mean and invstd = 1/sqrt(var + eps)
    recomputed from x (so they carry its graph)."""
    acc = R.acc_dtype(x.dtype)
    xf = x.to(acc)
    dims = _dims(x)
    mean = xf.mean(dims)
    var = (xf - _chan(mean, x)).square().mean(dims)
    invstd = torch.rsqrt(var + eps)
    return R.batch_norm_reference_bwd(dy, x, mean, invstd, weight, bias, True, activation,
                                      needs, noise)


def lp_norm_grads(dy, x, p, weight, bias, centered, eps, needs):
    """Training l_p normalization's (dx, dweight, dbias), the batch mean and s_p recomputed
    from x."""
    acc = R.acc_dtype(x.dtype)
    xf = x.to(acc)
    dims = _dims(x)
    mean = xf.mean(dims)
    z = xf - _chan(mean, x) if centered else xf
    scale = R._lp_scale(z, p, dims)
    return R.lp_norm_reference_bwd(dy, x, p, mean, scale, weight, bias, True, centered, eps,
                                   needs)


def no_double_backward(op: str, why: str, instead: str) -> RuntimeError:
    """The error of an op whose backward cannot be differentiated (raised when a graph of its
    gradient is asked for, never silently None)."""
    return RuntimeError(
        f"{op}: double backward (a gradient with create_graph=True) is not supported: {why}. "
        f"{instead}")


__all__ = ["batch_norm_family_grads", "batch_norm_grads", "grads", "lp_norm_family_grads",
           "lp_norm_grads", "no_double_backward", "residual_grad"]
