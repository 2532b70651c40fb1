"""The registered torch ops, and :class:`OpPlan`: the plan of the traced route.

Under torch.compile, export, fake tensors or a dispatch mode (FlopCounterMode, make_fx, ...),
:mod:`bnkernels.functional` hands :class:`~.autograd.NormFunction` an :class:`OpPlan`
instead of a backend's plan. Its ``forward`` and ``backward`` call two ``torch.library``
custom ops per family, which compilers and modes can see: ``bnkernels::batch_norm`` (forward;
it updates the running buffers and the batch counter in place, declared with
``mutates_args``) and ``bnkernels::batch_norm_backward``; ``bnkernels::lp_norm`` and
``bnkernels::lp_norm_backward``. Each has a fake (meta) implementation, so torch.compile
traces them (fullgraph) and ``torch.library.opcheck`` checks them. Their real implementations
look the backend's plan up in :data:`~.backends.plan.PLANS` (keyed by the same
:class:`~.backends.plan.Signature`, with the backend named) and run it: both routes run the
same kernels.

The backend is an argument of the ops (its name), decided when the graph is traced
(:func:`bnkernels.backends.backend_name_for_compile`). The forward ops return what the plan
saves for its backward (the eval snapshots included), so the traced route derives nothing
itself.
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends.family import family_of
from .backends.plan import BasePlan, Call, Saved, Signature, acc_dtype
from .noise import NoiseConfig


def _empty(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty((0,), dtype=dtype)


def _noise(noise: Optional[List[float]], seed: int, step: int, step_tensor: Optional[Tensor]):
    """The plans' ``(NoiseConfig, seed, step)`` from the ops' flat arguments."""
    if noise is None:
        return None
    return (NoiseConfig(*noise), seed, step_tensor if step_tensor is not None else step)


def _plan(op, x, training, activation, noise, p, centered, counter, weight, bias,
          running_mean, running_var, backend, residual=None):
    sig = Signature.of(op, x, training, activation=activation, noise=noise, p=p,
                       centered=centered, counter=counter is not None, weight=weight,
                       bias=bias, running_mean=running_mean, running_var=running_var,
                       residual=residual, backend=backend)
    return backends.plan_of(sig, x)


def _saved_or_empty(x, a, b):
    if a is None:
        acc = acc_dtype(x.dtype)
        return _empty(x, acc), _empty(x, acc)
    if isinstance(a, tuple):  # the cpu plans keep a noisy call's noise beside its mean
        a = a[0]
    return a, b


def _forward(plan, x, running_mean, running_var, weight, bias, momentum, eps, counter):
    """(y, saved_a, saved_b) of a plan's forward without noise, as the forward ops return
    them."""
    y, a, b, _ = plan.forward(x, weight, bias,
                              Call(running_mean, running_var, plan, momentum, eps, None, counter))
    return (y, *_saved_or_empty(x, a, b))


def forward_like(x: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Tensor]:
    """The fake (meta) implementation of a forward op whose first argument is x: y like x,
    two (C,) statistics."""
    acc = acc_dtype(x.dtype)
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


# ----------------------------------------------------------------------------- BatchNorm


@torch.library.custom_op("bnkernels::batch_norm",
                         mutates_args=("running_mean", "running_var", "counter"))
def batch_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  counter: Optional[Tensor], training: bool, momentum: float, eps: float,
                  activation: Optional[str], noise: Optional[List[float]], seed: int,
                  step: int, step_tensor: Optional[Tensor], backend: str,
                  residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, saved_mean, saved_invstd, step_used): the batch statistics in training, snapshots of
    the statistics used in eval. ``noise`` = [n_mu, n_sigma, r_mu, r_sigma] or None; the step
    is ``step_tensor`` if given (read on device), else ``step``. ``step_used`` is a copy of
    ``step_tensor`` (empty if None) for the backward: the step buffer may advance before it
    runs, and a copy made inside this op cannot be folded back into the buffer by a compiler.
    ``counter`` (a module's num_batches_tracked) is incremented. ``residual``: added before
    the activation (or None)."""
    nz = _noise(noise, seed, step, step_tensor)
    plan = _plan("batch_norm", x, training, activation, nz, None, None, counter, weight, bias,
                 running_mean, running_var, backend, residual)
    y, a, b, used = plan.forward(x, weight, bias, Call(running_mean, running_var, plan, momentum,
                                                       eps, nz, counter), True, residual)
    a, b = _saved_or_empty(x, a, b)
    if step_tensor is None:
        used = _empty(x, torch.int64)
    elif used is None:
        used = step_tensor.reshape(1).to(torch.int64, copy=True)
    return y, a, b, used


@batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, counter, training, momentum, eps, activation,
      noise, seed, step, step_tensor, backend, residual=None):
    acc = acc_dtype(x.dtype)
    used = (x.new_empty((1,), dtype=torch.int64) if step_tensor is not None
            else _empty(x, torch.int64))
    C = x.shape[1]
    return (torch.empty_like(x), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc),
            used)


@torch.library.custom_op("bnkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                           activation: Optional[str], needs: List[bool],
                           noise: Optional[List[float]], seed: int, step: int,
                           step_tensor: Optional[Tensor], backend: str,
                           residual: bool = False, out: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) from what the forward op saved; an empty tensor for
    each gradient not in ``needs`` (three booleans, a fourth with ``residual``: the call had
    a residual, ``out`` its forward's output where a ReLU was fused)."""
    nz = _noise(noise, seed, step, step_tensor)
    plan = _plan("batch_norm", x, training, activation, nz, None, None, None, weight, bias,
                 None, None, backend, x if residual else None)
    saved = Saved(mean, invstd, 0.0, nz, out)
    if residual:
        dx, dw, db, dz = plan.backward(dy, x, weight, bias, saved, tuple(needs))
        if dz is dy:  # no activation: d(residual) = dy, which an op's output may not alias
            dz = dy.clone()
    else:
        dx, dw, db = plan.backward(dy, x, weight, bias, saved, tuple(needs))
        dz = None
    return (dx if dx is not None else _empty(x), dw if dw is not None else _empty(x),
            db if db is not None else _empty(x), dz if dz is not None else _empty(x))


def grads_like(x, weight, bias, needs):
    return (torch.empty_like(x) if needs[0] else _empty(x),
            torch.empty_like(weight) if needs[1] and weight is not None else _empty(x),
            torch.empty_like(bias) if needs[2] and bias is not None else _empty(x))


@batch_norm_backward_op.register_fake
def _(dy, x, mean, invstd, weight, bias, training, activation, needs, noise, seed, step,
      step_tensor, backend, residual=False, out=None):
    dz = torch.empty_like(x) if residual and needs[3] else _empty(x)
    return (*grads_like(x, weight, bias, needs), dz)


# ----------------------------------------------------------------------------- l_p norm


def _p(p: float):
    return math.inf if math.isinf(p) else int(p)


@torch.library.custom_op("bnkernels::lp_norm",
                         mutates_args=("running_mean", "running_scale", "counter"))
def lp_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_scale: Optional[Tensor],
               counter: Optional[Tensor], p: float, training: bool, momentum: float,
               eps: float, centered: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, saved_mean, saved_scale): the batch mean and s_p in training, snapshots of the
    running mean and 1/(running_scale + eps) used in eval."""
    plan = _plan("lp_norm", x, training, None, None, _p(p), centered, counter, weight, bias,
                 running_mean, running_scale, backend)
    return _forward(plan, x, running_mean, running_scale, weight, bias, momentum, eps, counter)


lp_norm_op.register_fake(forward_like)


@torch.library.custom_op("bnkernels::lp_norm_backward", mutates_args=())
def lp_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], p: float,
                        training: bool, centered: bool, eps: float, needs: List[bool],
                        backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from what the forward op saved; an empty tensor for each gradient
    not in ``needs``."""
    plan = _plan("lp_norm", x, training, None, None, _p(p), centered, None, weight, bias, None,
                 None, backend)
    dx, dw, db = plan.backward(dy, x, weight, bias, Saved(mean, scale, eps, None), tuple(needs))
    return (dx if dx is not None else _empty(x), dw if dw is not None else _empty(x),
            db if db is not None else _empty(x))


@lp_norm_backward_op.register_fake
def _(dy, x, mean, scale, weight, bias, p, training, centered, eps, needs, backend):
    return grads_like(x, weight, bias, needs)


# ----------------------------------------------------------------------------- the plans


class OpPlan(BasePlan):
    """The plan of the traced route: :class:`~.backends.plan.Plan` on a family's registered
    ops, for one call's flags and the backend its graph fixed. ``OpPlan(op, ...)`` gives the
    op family's own subclass (its descriptor's ``op_plan``)."""

    def __new__(cls, op: str, *args, **kwargs):
        if cls is OpPlan:
            cls = family_of(op).op_plan
            if cls is None:
                raise RuntimeError(f"bnkernels: the {op!r} op family has no traced route "
                                   "(its descriptor names no op_plan)")
        return object.__new__(cls)

    def __init__(self, op: str, training: bool, activation=None, p=None, centered=None,
                 backend: str = "reference", residual: bool = False):
        self.op = op
        self.residual = residual
        self.training = bool(training)
        self.activation = activation
        self.p = p
        self.centered = centered
        self.backend = backend

    @staticmethod
    def _grads(dx, dw, db, needs):
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None)


class BatchNormOpPlan(OpPlan):
    """BatchNorm's (and noisy BatchNorm's) traced route: ``bnkernels::batch_norm`` and
    ``bnkernels::batch_norm_backward``."""

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        running_mean, running_var, _, momentum, eps, noise, counter = call
        cfg, seed, step, step_tensor = _flat_noise(noise)
        y, a, b, used = batch_norm_op(x, weight, bias, running_mean, running_var, counter,
                                      self.training, momentum, eps, self.activation, cfg, seed,
                                      step, step_tensor, self.backend, residual)
        return y, a, b, used if step_tensor is not None else None

    def backward(self, dy, x, weight, bias, saved, needs):
        a, b, _, noise, out = saved
        needs = [bool(n) for n in needs]
        cfg, seed, step, step_tensor = _flat_noise(noise)
        if self.residual:
            relu = self.activation == "relu"  # else d(residual) is dy itself
            dx, dw, db, dz = batch_norm_backward_op(
                dy, x, a, b, weight, bias, self.training, self.activation,
                needs[:3] + [needs[3] and relu], cfg, seed, step, step_tensor, self.backend,
                True, out)
            return (*self._grads(dx, dw, db, needs), (dz if relu else dy) if needs[3] else None)
        return self._grads(*batch_norm_backward_op(
            dy, x, a, b, weight, bias, self.training, self.activation, needs, cfg, seed, step,
            step_tensor, self.backend)[:3], needs)


class LpNormOpPlan(OpPlan):
    """l_p normalization's traced route: ``bnkernels::lp_norm`` and
    ``bnkernels::lp_norm_backward``."""

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_var, _, momentum, eps, _, counter = call
        y, a, b = lp_norm_op(x, weight, bias, running_mean, running_var, counter, float(self.p),
                             self.training, momentum, eps, bool(self.centered), self.backend)
        return y, a, b, None

    def backward(self, dy, x, weight, bias, saved, needs):
        needs = [bool(n) for n in needs]
        return self._grads(*lp_norm_backward_op(dy, x, saved[0], saved[1], weight, bias,
                                                float(self.p), self.training,
                                                bool(self.centered), saved[2], needs,
                                                self.backend), needs)


# ----------------------------------------------------------------------------- other families


_FAMILY_OPS: dict = {}  # family name -> (forward op, backward op, traced-route plan class)


def register_family_ops(name: str):
    """Register ``bnkernels::<name>`` and ``bnkernels::<name>_backward`` for an op family
    whose calls have no flags but ``training`` (a family a user registers: see
    :func:`bnkernels.families.register`); gives its traced route's plan class. The ops look
    the backend's plan up as the built-in families' do."""
    if name in _FAMILY_OPS:  # a family registered again: the same ops
        return _FAMILY_OPS[name][2]

    @torch.library.custom_op(f"bnkernels::{name}",
                             mutates_args=("running_mean", "running_var", "counter"))
    def forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   counter: Optional[Tensor], training: bool, momentum: float, eps: float,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        plan = _plan(name, x, training, None, None, None, None, counter, weight, bias,
                     running_mean, running_var, backend)
        return _forward(plan, x, running_mean, running_var, weight, bias, momentum, eps,
                        counter)

    forward_op.register_fake(forward_like)

    @torch.library.custom_op(f"bnkernels::{name}_backward", mutates_args=())
    def backward_op(dy: Tensor, x: Tensor, a: Tensor, b: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], training: bool, eps: float, needs: List[bool],
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        plan = _plan(name, x, training, None, None, None, None, None, weight, bias, None, None,
                     backend)
        dx, dw, db = plan.backward(dy, x, weight, bias, Saved(a, b, eps, None), tuple(needs))
        return (dx if dx is not None else _empty(x), dw if dw is not None else _empty(x),
                db if db is not None else _empty(x))

    @backward_op.register_fake
    def _(dy, x, a, b, weight, bias, training, eps, needs, backend):
        return grads_like(x, weight, bias, needs)

    class FamilyOpPlan(OpPlan):
        __doc__ = f"The traced route of {name!r}: bnkernels::{name} and its backward."

        def forward(self, x, weight, bias, call, need_saved=True, residual=None):
            running_mean, running_var, _, momentum, eps, _, counter = call
            y, a, b = _FAMILY_OPS[self.op][0](x, weight, bias, running_mean, running_var,
                                              counter, self.training, momentum, eps,
                                              self.backend)
            return y, a, b, None

        def backward(self, dy, x, weight, bias, saved, needs):
            needs = [bool(n) for n in needs]
            return self._grads(*_FAMILY_OPS[self.op][1](dy, x, saved[0], saved[1], weight, bias,
                                                        self.training, saved[2], needs,
                                                        self.backend), needs)

    _FAMILY_OPS[name] = (forward_op, backward_op, FamilyOpPlan)
    return FamilyOpPlan


def _flat_noise(noise):
    """(config list, seed, int step, step tensor) for the ops, from ``(NoiseConfig, seed,
    step)`` or None."""
    if noise is None:
        return None, 0, 0, None
    cfg, seed, step = noise
    if isinstance(step, torch.Tensor):
        return cfg.as_list(), int(seed), 0, step
    return cfg.as_list(), int(seed), int(step), None


__all__ = ["BatchNormOpPlan", "LpNormOpPlan", "OpPlan", "batch_norm_backward_op",
           "batch_norm_op", "lp_norm_backward_op", "lp_norm_op", "register_family_ops"]
