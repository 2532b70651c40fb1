"""The autograd Functions: one for every op family on a :class:`~.backends.plan.Plan`, and
SyncBatchNorm's.

:class:`NormFunction` is what a training step runs for BatchNorm, noisy BatchNorm and l_p
normalization alike: a plain ``torch.autograd.Function`` whose forward and backward call the
plan of the call's signature. In eager mode that is a backend's plan (kernel launches, no
dispatcher in between); under torch.compile, export, fake tensors or a dispatch mode it is an
:class:`~.library.OpPlan`, which calls the registered torch ops instead. The formulas are in
:mod:`bnkernels.backends.reference.formulas`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import double_backward
from .backends.plan import acc_dtype

_grad_enabled = torch.is_grad_enabled


def _needs(ctx, weight, bias) -> tuple[bool, bool, bool]:
    n = ctx.needs_input_grad
    return (bool(n[0]), bool(n[1]) and weight is not None, bool(n[2]) and bias is not None)


class NormFunction(torch.autograd.Function):
    """y = plan.forward(x, ...); its backward is ``plan.backward`` with what the forward saved.

    ``call`` = (running_mean, running_var, plan, momentum, eps, noise, counter): one argument,
    so that autograd looks at three tensors per call, not ten (the running buffers never get
    gradients; ``running_var`` is the running scale for l_p).

    Training: the plan saves the batch statistics (BatchNorm: mean and 1/sqrt(var + eps); l_p:
    mean and s_p). Eval: it saves snapshots of the statistics this forward used, so the
    backward is that of this forward whatever happens to the running buffers in between (they
    are constants: no gradient reaches them). A noisy step given as a tensor is snapshotted by
    the forward too (the step buffer advances after every training forward), and the noise is
    regenerated from its key in backward, never stored. ``counter`` (a module's
    num_batches_tracked) is incremented by the forward. The plan's saved statistics are its own
    allocations, neither inputs nor outputs, so they are kept on ``ctx`` as they are; x, weight
    and bias go through ``save_for_backward`` (an in-place change to them before the backward
    is caught).

    Double backward: when a graph of the gradient is asked for (create_graph=True, grad mode on
    in the backward), the backward runs :func:`bnkernels.double_backward.grads` -- the same
    gradients as differentiable torch ops, the batch statistics recomputed from x -- in place
    of the plan's kernels, which serve every other backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        running_mean, running_var, plan, momentum, eps, noise, counter = call
        y, a, b, used = plan.forward(x, running_mean, running_var, weight, bias, momentum, eps,
                                     noise, True, counter)
        ctx.save_for_backward(x, weight, bias)
        ctx.state = (plan, eps, noise if used is None else (noise[0], noise[1], used), a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        plan, eps, noise, a, b = ctx.state
        needs = _needs(ctx, weight, bias)
        if _grad_enabled():  # create_graph=True: a backward autograd can differentiate
            a, b, used = plan.split_saved(a, b, None)  # a step the plan kept with its stats
            if used is not None:
                noise = (noise[0], noise[1], used)
            dx, dw, db = double_backward.grads(plan, dy, x, weight, bias, a, b, eps, needs,
                                               noise)
        else:
            dx, dw, db = plan.backward(dy, x, a, b, weight, bias, eps, needs, noise)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                None)


class ResidualNormFunction(torch.autograd.Function):
    """out = act(bn(x) + residual): :class:`NormFunction` with a fourth differentiable input.

    The backward needs to know where a fused ReLU was active: it reads the forward's output
    (out > 0 there, as torch's own ReLU backward reads its result) rather than recomputing
    bn(x) + residual, which would read the residual instead: the same bytes, but the output is
    the next layer's input, which that layer keeps anyway, while a residual may be a tensor
    nothing else keeps (a downsampling branch's). Without an activation the output is not
    saved: d(residual) is dy itself. ``docs/fused-ops.md`` counts the bytes."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        running_mean, running_var, plan, momentum, eps, noise, counter = call
        y, a, b, used = plan.forward(x, running_mean, running_var, weight, bias, momentum, eps,
                                     noise, True, counter, residual)
        relu = getattr(plan, "sig", plan).activation == "relu"  # an OpPlan: itself
        ctx.save_for_backward(x, weight, bias, y if relu else None)
        ctx.state = (plan, eps, noise if used is None else (noise[0], noise[1], used), a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, out = ctx.saved_tensors
        plan, eps, noise, a, b = ctx.state
        n = ctx.needs_input_grad
        needs = (*_needs(ctx, weight, bias), bool(n[3]))
        if _grad_enabled():  # create_graph=True: a backward autograd can differentiate
            a, b, used = plan.split_saved(a, b, None)
            if used is not None:
                noise = (noise[0], noise[1], used)
            g = double_backward.residual_grad(dy, out, getattr(plan, "sig", plan).activation)
            dx, dw, db = double_backward.grads(plan, g, x, weight, bias, a, b, eps, needs[:3],
                                               noise, activation=None)
            dz = g
        else:
            dx, dw, db, dz = plan.backward(dy, x, a, b, weight, bias, eps, needs, noise, out)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                dz if needs[3] else None, None)


class SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the union of the batches of all processes in ``group``, on a plan's
    :class:`~.backends.plan.SyncStages`.

    Forward: each process computes its per-channel (count n_r, mean_r, biased var_r); they are
    all-gathered and merged (Chan et al.): n = sum n_r, mean = sum n_r mean_r / n,
    var = (sum n_r var_r + sum n_r (mean_r - mean)^2) / n. Running statistics get the unbiased
    n / (n - 1) var. Backward: the per-channel sums [sum(g), sum(g (x - mean))] are all-reduced
    and divided by n for dx; weight and bias gradients are each process's own sums (DDP then
    reduces them), as in torch.nn.SyncBatchNorm. Everything stays on the device.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world,
                plan):
        acc = acc_dtype(x.dtype)
        C = x.shape[1]
        count = x.numel() // C
        if count > 0:
            mean, var = plan.stats(x)
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
        y = plan.apply(x, mean, invstd, weight, bias, None) if count > 0 else torch.empty_like(x)
        ctx.save_for_backward(x, weight, bias, mean, invstd, n)
        ctx.group, ctx.plan = group, plan
        return y

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():
            raise double_backward.no_double_backward(
                "SyncBatchNorm (across processes)",
                "its statistics merge every process's batch, which a differentiable local "
                "recomputation cannot see",
                "Take second derivatives in one process (bnkernels.BatchNorm*d, or "
                "SyncBatchNorm outside a multi-process group).")
        return SyncBatchNormFunction._backward(ctx, dy)

    @staticmethod
    @torch.no_grad()
    def _backward(ctx, dy):
        x, weight, bias, mean, invstd, n = ctx.saved_tensors
        plan = ctx.plan
        if x.numel() > 0:
            sums = plan.bwd_reduce(dy, x, mean, invstd, weight, bias, None)
        else:
            sums = torch.zeros((2, x.shape[1]), device=x.device, dtype=mean.dtype)
        dw = (sums[1] * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = sums[0].to(bias.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            if x.numel() > 0:
                dx = plan.bwd_dx(dy, x, mean, invstd, weight, bias, total / n, None)
            else:
                dx = torch.zeros_like(x)
        return dx, dw, db, None, None, None, None, None, None, None


__all__ = ["NormFunction", "ResidualNormFunction", "SyncBatchNormFunction"]
