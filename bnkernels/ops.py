"""Autograd wiring of the ops, in two routes.

**Eager** (what a training step runs): ``BatchNormFunction`` / ``LpNormFunction``, plain
``torch.autograd.Function``s that call a backend's plan (:mod:`bnkernels.backends`) directly:
no Python dispatcher, no custom-op machinery between the module and the kernel launches.

**Traced** (torch.compile, export, fake tensors, dispatch modes): each op family is a pair of
``torch.library`` custom ops, ``bnkernels::<family>`` (forward; it updates the running buffers
in place, declared with ``mutates_args``) and ``bnkernels::<family>_backward``, each with a
fake (meta) implementation, so torch.compile traces them (fullgraph) and
``torch.library.opcheck`` checks them; ``BatchNormOpFunction`` / ``LpNormOpFunction`` connect
them (the forward op mutates its inputs, and torch.library does not take an autograd formula
for a mutating op). The backend is an argument (its name). Both routes run the same kernels:
the ops' implementations go through the same per-signature plans.

:mod:`bnkernels.functional` picks the route.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends
from .noise import NoiseConfig


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty((0,), dtype=dtype)


def _noise(noise: Optional[List[float]], seed: int, step: int, step_tensor: Optional[Tensor]):
    """The backends' ``(NoiseConfig, seed, step)`` from the ops' flat arguments."""
    if noise is None:
        return None
    return (NoiseConfig(*noise), seed, step_tensor if step_tensor is not None else step)


# ----------------------------------------------------------------------------- BatchNorm


@torch.library.custom_op("bnkernels::batch_norm", mutates_args=("running_mean", "running_var"))
def batch_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                  momentum: float, eps: float, activation: Optional[str],
                  noise: Optional[List[float]], seed: int, step: int,
                  step_tensor: Optional[Tensor], backend: str
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd, step_used); the saved statistics are empty in eval mode.
    ``noise`` = [n_mu, n_sigma, r_mu, r_sigma] or None; the step is ``step_tensor`` if given
    (read on device), else ``step``. ``step_used`` is a copy of ``step_tensor`` (empty if
    None) for the backward: the step buffer may advance before it runs, and a copy made
    inside this op cannot be folded back into the buffer by a compiler."""
    y, mean, invstd = backends.backend(backend).batch_norm_fwd(
        x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
        _noise(noise, seed, step, step_tensor))
    if mean is None:
        mean, invstd = _empty(x, _acc(x.dtype)), _empty(x, _acc(x.dtype))
    used = step_tensor.clone() if step_tensor is not None else _empty(x, torch.int64)
    return y, mean, invstd, used


@batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, noise,
      seed, step, step_tensor, backend):
    n = x.shape[1] if training else 0
    acc = _acc(x.dtype)
    used = torch.empty_like(step_tensor) if step_tensor is not None else _empty(x, torch.int64)
    return (torch.empty_like(x), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc),
            used)


@torch.library.custom_op("bnkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                           activation: Optional[str], needs: List[bool],
                           noise: Optional[List[float]], seed: int, step: int,
                           step_tensor: Optional[Tensor], backend: str
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an empty tensor for each gradient not in ``needs``."""
    dx, dw, db = backends.backend(backend).batch_norm_bwd(
        dy, x, mean, invstd, weight, bias, training, activation, tuple(needs),
        _noise(noise, seed, step, step_tensor))
    return (dx if dx is not None else _empty(x), dw if dw is not None else _empty(x),
            db if db is not None else _empty(x))


def _grads_like(x, weight, bias, needs):
    return (torch.empty_like(x) if needs[0] else _empty(x),
            torch.empty_like(weight) if needs[1] and weight is not None else _empty(x),
            torch.empty_like(bias) if needs[2] and bias is not None else _empty(x))


@batch_norm_backward_op.register_fake
def _(dy, x, mean, invstd, weight, bias, training, activation, needs, noise, seed, step,
      step_tensor, backend):
    return _grads_like(x, weight, bias, needs)


def _needs(ctx, weight, bias) -> List[bool]:
    n = ctx.needs_input_grad
    return [bool(n[0]), bool(n[1]) and weight is not None, bool(n[2]) and bias is not None]


def _grads(needs, dx, dw, db, n_other):
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
            *([None] * n_other))


class BatchNormFunction(torch.autograd.Function):
    """y = act(w * (x - mean) * invstd + b): the eager route, on a backend plan.

    The formulas are those of :class:`BatchNormOpFunction`. In eval mode the forward kernel
    snapshots the statistics it used (mean and invstd), so the backward is that of this
    forward whatever happens to the running buffers in between; a noisy step given as a
    tensor is snapshotted by the forward kernel for the backward too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, plan, momentum, eps, noise):
        y, a, b, used = plan.forward(x, running_mean, running_var, weight, bias, momentum, eps,
                                     noise)
        ctx.save_for_backward(x, weight, bias, a, b, used)
        ctx.plan, ctx.eps, ctx.noise = plan, eps, noise
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, a, b, used = ctx.saved_tensors
        noise = ctx.noise
        if used is not None:
            noise = (noise[0], noise[1], used)
        needs = _needs(ctx, weight, bias)
        dx, dw, db = ctx.plan.backward(dy, x, a, b, weight, bias, ctx.eps, needs, noise)
        return _grads(needs, dx, dw, db, 6)


class LpNormFunction(torch.autograd.Function):
    """l_p normalization, the eager route (formulas: :class:`LpNormOpFunction`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_scale, plan, momentum, eps):
        y, a, b, _ = plan.forward(x, running_mean, running_scale, weight, bias, momentum, eps)
        ctx.save_for_backward(x, weight, bias, a, b)
        ctx.plan, ctx.eps = plan, eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, a, b = ctx.saved_tensors
        needs = _needs(ctx, weight, bias)
        dx, dw, db = ctx.plan.backward(dy, x, a, b, weight, bias, ctx.eps, needs)
        return _grads(needs, dx, dw, db, 5)


class BatchNormOpFunction(torch.autograd.Function):
    """y = act(w * (x - mean) * invstd + b), see :mod:`bnkernels.backends.reference`; the
    traced route, through the registered ops.

    Training: mean and invstd = 1/sqrt(var + eps) are the batch statistics (biased variance),
    and the backward is

        g  = dy * [y > 0] (fused ReLU) or dy
        db = sum(g),  dw = sum(g * xhat)
        dx = w * invstd * (g - db / M - xhat * dw / M)

    Eval: mean and invstd come from the running buffers, which are constants:
    dx = w * invstd * g. Running buffers never receive gradients.

    Noisy BatchNorm (``noise`` = [n_mu, n_sigma, r_mu, r_sigma]): out = act(s * a + m) with
    a = w * xhat + b and per-element noise (s, m) regenerated from its key (seed, step) in
    backward, so g = s * dy * [out > 0] and the formulas above hold with that g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation, noise, seed, step, step_tensor, backend):
        y, mean, invstd, used = batch_norm_op(x, weight, bias, running_mean, running_var,
                                              training, momentum, eps, activation, noise, seed,
                                              step, step_tensor, backend)
        if not training:
            # Snapshots of the eval statistics, so a later update cannot change this backward.
            acc = _acc(x.dtype)
            mean = running_mean.to(acc).clone()
            invstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd,
                              used if step_tensor is not None else None)
        ctx.args = (training, activation, noise, seed, step, backend)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, invstd, step_tensor = ctx.saved_tensors
        training, activation, noise, seed, step, backend = ctx.args
        needs = _needs(ctx, weight, bias)
        dx, dw, db = batch_norm_backward_op(dy, x, mean, invstd, weight, bias, training,
                                            activation, needs, noise, seed, step, step_tensor,
                                            backend)
        return _grads(needs, dx, dw, db, 11)


# ----------------------------------------------------------------------------- l_p norm


def _p(p: float):
    return math.inf if math.isinf(p) else int(p)


@torch.library.custom_op("bnkernels::lp_norm", mutates_args=("running_mean", "running_scale"))
def lp_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_scale: Optional[Tensor], p: float,
               training: bool, momentum: float, eps: float, centered: bool, backend: str
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, save_mean, save_scale); the saved statistics are empty in eval mode."""
    y, mean, scale = backends.backend(backend).lp_norm_fwd(
        x, _p(p), running_mean, running_scale, weight, bias, training, momentum, eps, centered)
    if mean is None:
        mean, scale = _empty(x, _acc(x.dtype)), _empty(x, _acc(x.dtype))
    return y, mean, scale


@lp_norm_op.register_fake
def _(x, weight, bias, running_mean, running_scale, p, training, momentum, eps, centered,
      backend):
    n = x.shape[1] if training else 0
    acc = _acc(x.dtype)
    return torch.empty_like(x), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


@torch.library.custom_op("bnkernels::lp_norm_backward", mutates_args=())
def lp_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor], p: float,
                        training: bool, centered: bool, eps: float, needs: List[bool],
                        backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an empty tensor for each gradient not in ``needs``."""
    dx, dw, db = backends.backend(backend).lp_norm_bwd(
        dy, x, _p(p), mean, scale, weight, bias, training, centered, eps, tuple(needs))
    return (dx if dx is not None else _empty(x), dw if dw is not None else _empty(x),
            db if db is not None else _empty(x))


@lp_norm_backward_op.register_fake
def _(dy, x, mean, scale, weight, bias, p, training, centered, eps, needs, backend):
    return _grads_like(x, weight, bias, needs)


class LpNormOpFunction(torch.autograd.Function):
    """y = w * (x - mean) / (s_p + eps) + b, see :mod:`bnkernels.backends.reference`; the
    traced route, through the registered ops.

    Per channel, mean = mean(x) and s_1 = mean|z|, s_2 = sqrt(mean z^2), s_inf = max|z|, with
    z = x (uncentered, the default) or z = x - mean (``centered``). With a = s_p + eps,
    xhat = (x - mean) / a and g = dy, the backward is

        db = sum(g),  dw = sum(g * xhat)
        dx = w / a * (g - db / M) - k3 * (f - k4),   k3 = w * dw / (a * D)

    where ds_p/dz = f / D: f = sign(z), D = M (p=1); f = z, D = M * s (p=2; no scale term where
    s = 0); f = sign(z) * [|z| = s], D = #{|z| = s} (p=inf: the max's gradient is split equally
    among the values that attain it, as torch.amax's); k4 = sum(f) / M when centered (z depends
    on x through the mean), else 0.

    Eval: mean and s_p are running_mean and running_scale, constants: dx = w / a * g. Running
    buffers never receive gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_scale, p, training, momentum, eps,
                centered, backend):
        y, mean, scale = lp_norm_op(x, weight, bias, running_mean, running_scale, float(p),
                                    training, momentum, eps, centered, backend)
        if not training:
            mean = running_mean.to(_acc(x.dtype)).clone()
            scale = running_scale.to(_acc(x.dtype)).clone()
        ctx.save_for_backward(x, weight, bias, mean, scale)
        ctx.args = (float(p), training, centered, eps, backend)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, scale = ctx.saved_tensors
        p, training, centered, eps, backend = ctx.args
        needs = _needs(ctx, weight, bias)
        dx, dw, db = lp_norm_backward_op(dy, x, mean, scale, weight, bias, p, training,
                                         centered, eps, needs, backend)
        return _grads(needs, dx, dw, db, 8)


# ----------------------------------------------------------------------------- SyncBatchNorm


class SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the union of the batches of all processes in ``group``.

    Forward: each process computes its per-channel (count n_r, mean_r, biased var_r); they are
    all-gathered and merged (Chan et al.): n = sum n_r, mean = sum n_r mean_r / n,
    var = (sum n_r var_r + sum n_r (mean_r - mean)^2) / n. Running statistics get the unbiased
    n / (n - 1) var. Backward: the per-channel sums [sum(g), sum(g (x - mean))] are all-reduced
    and divided by n for dx; weight and bias gradients are each process's own sums (DDP then
    reduces them), as in torch.nn.SyncBatchNorm. Everything stays on the device.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, activation,
                group, world, backend):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        C = x.shape[1]
        count = x.numel() // C
        if count > 0:
            mean, var = backend.batch_norm_stats(x)
        else:
            mean = var = torch.zeros(C, device=x.device, dtype=acc)
        local = torch.cat([torch.full((1,), float(count), device=x.device, dtype=acc),
                           mean, var])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # [world, 1 + 2C]
        n_r, mean_r, var_r = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]
        n = n_r.sum(0)
        mean = (n_r * mean_r).sum(0) / n
        m2 = (n_r * var_r).sum(0) + (n_r * (mean_r - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / n + eps)
        if running_mean is not None:
            unbiased = m2 / (n - 1).clamp_min(1)
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
        if count > 0:
            y = backend.batch_norm_apply(x, mean, invstd, weight, bias, activation)
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, weight, bias, mean, invstd, n)
        ctx.activation, ctx.group, ctx.backend = activation, group, backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, invstd, n = ctx.saved_tensors
        be = ctx.backend
        if x.numel() > 0:
            sums = be.batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, ctx.activation)
        else:
            sums = torch.zeros((2, x.shape[1]), device=x.device, dtype=mean.dtype)
        dw = (sums[1] * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = sums[0].to(bias.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            if x.numel() > 0:
                dx = be.batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias, total / n,
                                          ctx.activation)
            else:
                dx = torch.zeros_like(x)
        return dx, dw, db, None, None, None, None, None, None, None, None
