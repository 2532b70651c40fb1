"""Autograd wiring of the ops: one ``torch.autograd.Function`` per op family, dispatching to the
selected backend's forward and backward kernels."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backends import Backend


class BatchNormFunction(torch.autograd.Function):
    """y = act(w * (x - mean) * invstd + b), see :mod:`bnkernels.backends.reference`.

    Training: mean and invstd = 1/sqrt(var + eps) are the batch statistics (biased variance),
    and the backward is

        g  = dy * [y > 0] (fused ReLU) or dy
        db = sum(g),  dw = sum(g * xhat)
        dx = w * invstd * (g - db / M - xhat * dw / M)

    Eval: mean and invstd come from the running buffers, which are constants:
    dx = w * invstd * g. Running buffers never receive gradients.

    Noisy BatchNorm (``noise`` = (NoiseConfig, seed, step)): out = act(s * a + m) with
    a = w * xhat + b and per-element noise (s, m) regenerated from its key in backward, so
    g = s * dy * [out > 0] and the formulas above hold with that g.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation, backend: Backend, noise=None):
        y, mean, invstd = backend.batch_norm_fwd(
            x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
            noise)
        if not training and any(ctx.needs_input_grad[:3]):
            # Snapshot of the eval statistics; running_mean is saved by reference, so autograd's
            # version check catches it if a later forward updates it before this backward.
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            mean = running_mean
            invstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.training = training
        ctx.activation = activation
        ctx.backend = backend
        if noise is not None and isinstance(noise[2], torch.Tensor):
            # The backward regenerates this step's noise even if the step buffer moves on.
            noise = (noise[0], noise[1], noise[2].clone())
        ctx.noise = noise
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = ctx.backend.batch_norm_bwd(
            dy, x, mean, invstd, weight, bias, ctx.training, ctx.activation,
            tuple(ctx.needs_input_grad[:3]), ctx.noise)
        return dx, dw, db, None, None, None, None, None, None, None, None
