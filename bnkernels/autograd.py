"""The autograd Function: one for every op family on a :class:`~.backends.plan.Plan`
(SyncBatchNorm's included: :mod:`bnkernels.sync`).

:class:`NormFunction` is what a training step runs for BatchNorm, noisy BatchNorm and l_p
normalization alike: a plain ``torch.autograd.Function`` whose forward and backward call the
plan of the call's signature. In eager mode that is a backend's plan (kernel launches, no
dispatcher in between); under torch.compile, export, fake tensors or a dispatch mode it is an
:class:`~.library.OpPlan`, which calls the registered torch ops instead. The formulas are in
:mod:`bnkernels.backends.reference.formulas`.
"""

from __future__ import annotations

import torch

from . import double_backward
from .backends.plan import Call, Saved

_grad_enabled = torch.is_grad_enabled


def _needs(ctx, weight, bias) -> tuple[bool, bool, bool]:
    n = ctx.needs_input_grad
    return (bool(n[0]), bool(n[1]) and weight is not None, bool(n[2]) and bias is not None)


def _detach(t):
    return None if t is None else t.detach()


class NormFunction(torch.autograd.Function):
    """y = plan.forward(x, weight, bias, call[, residual]); its backward is ``plan.backward``
    with what the forward saved (a :class:`~.backends.plan.Saved`).

    ``call``: a :class:`~.backends.plan.Call` (running buffers, plan, momentum, eps, noise,
    counter), or the plain tuple of its fields (the eager hot path). ``residual``: None, or a
    tensor added before the activation, out = act(bn(x) + residual) (BatchNorm): a fourth
    differentiable input, d(residual) the activation-masked dy.

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

    With a residual and a fused ReLU the backward needs to know where the ReLU was active: it
    reads the forward's output (out > 0 there, as torch's own ReLU backward reads its result)
    rather than recomputing bn(x) + residual, which would read the residual instead: the same
    bytes, but the output is the next layer's input, which that layer keeps anyway, while a
    residual may be a tensor nothing else keeps (a downsampling branch's). Without an
    activation the output is not saved: d(residual) is dy itself. ``docs/fused-ops.md``
    counts the bytes.

    Double backward: when a graph of the gradient is asked for (create_graph=True, grad mode on
    in the backward), the backward runs :func:`bnkernels.double_backward.grads` -- the op
    family's gradients as differentiable torch ops, the batch statistics recomputed from x --
    for the graph, and the plan's own backward (the backend's kernels) for the values: each
    gradient is ``graph + (kernels - graph).detach()``, the kernels' value with the formulas'
    derivative. So the first derivatives a create_graph backward returns are the backend's,
    and gradgradcheck compares the formulas' second derivatives with finite differences of the
    kernels' first derivatives (two independent computations). With a residual, the graph's
    values are returned as they are (d(residual) is the masked dy).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call, residual=None):
        plan = call[2]
        if residual is None:
            y, a, b, used = plan.forward(x, weight, bias, call)
            ctx.save_for_backward(x, weight, bias)
        else:
            y, a, b, used = plan.forward(x, weight, bias, call, True, residual)
            relu = getattr(plan, "sig", plan).activation == "relu"  # an OpPlan: itself
            ctx.save_for_backward(x, weight, bias, y if relu else None)
        noise = call[5]
        # a Saved's fields, in order, as a plain tuple (nothing built for the structure)
        ctx.state = (plan, (a, b, call[4], noise if used is None else
                            (noise[0], noise[1], used), None))
        return y

    @staticmethod
    def backward(ctx, dy):
        plan, saved = ctx.state
        tensors = ctx.saved_tensors
        if len(tensors) == 3:
            x, weight, bias = tensors
            needs = _needs(ctx, weight, bias)
            if _grad_enabled():  # create_graph=True: a backward autograd can differentiate
                graph = double_backward.grads(plan, dy, x, weight, bias, saved, needs)
                with torch.no_grad():
                    values = plan.backward(dy.detach(), x.detach(), _detach(weight),
                                           _detach(bias), saved, needs)
                dx, dw, db = (g if v is None or g is None else g + (v - g).detach()
                              for g, v in zip(graph, values))
            else:
                dx, dw, db = plan.backward(dy, x, weight, bias, saved, needs)
            return (dx if needs[0] else None, dw if needs[1] else None,
                    db if needs[2] else None, None)
        # with a residual: (dx, dw, db, None, dresidual)
        x, weight, bias, out = tensors
        needs = (*_needs(ctx, weight, bias), bool(ctx.needs_input_grad[4]))
        if _grad_enabled():
            g = double_backward.residual_grad(dy, out, getattr(plan, "sig", plan).activation)
            dx, dw, db = double_backward.grads(plan, g, x, weight, bias, saved, needs[:3],
                                               activation=None)
            dz = g
        else:
            dx, dw, db, dz = plan.backward(dy, x, weight, bias, (*saved[:4], out), needs)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                None, dz if needs[3] else None)


__all__ = ["Call", "NormFunction", "Saved"]
