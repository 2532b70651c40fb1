"""Eager PyTorch reference: the correctness oracle of every kernel, and the CPU path.

Forward and backward are written out as explicit formulas (not autograd through
``F.batch_norm``), in fp32 (fp64 for fp64 input), so the backward can be checked on its own.

BatchNorm, over the M = N * prod(spatial) values of each channel::

    mean    = sum(x) / M
    var     = sum((x - mean)^2) / M                       (biased: used to normalize)
    invstd  = 1 / sqrt(var + eps)
    xhat    = (x - mean) * invstd
    y       = act(w * xhat + b)

    running_mean <- momentum * mean + (1 - momentum) * running_mean
    running_var  <- momentum * var * M / (M - 1) + (1 - momentum) * running_var   (unbiased)

Backward, with g = dy (times [y > 0] for the fused ReLU)::

    dbias   = sum(g)
    dweight = sum(g * xhat)
    dx      = w * invstd * (g - dbias / M - xhat * dweight / M)      (training)
    dx      = w * invstd * g                                         (eval: statistics constant)
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] tensor shaped to broadcast against x (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def exponential_average_factor(momentum, num_batches_tracked: int | None) -> float:
    """The factor PyTorch's _BatchNorm uses: ``momentum``, or 1/num_batches when it is None."""
    if momentum is None:
        return 1.0 / float(num_batches_tracked)
    return momentum


def _relu(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, torch.zeros_like(y), y)  # NaN propagates, as torch.relu


def _relu_mask(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(y <= 0, torch.zeros_like(g), g)  # as torch's threshold_backward


def batch_norm_reference_fwd(x, running_mean, running_var, weight, bias, training, momentum,
                             eps, activation):
    """Returns ``(y, save_mean, save_invstd)``; updates the running buffers in place.

    In eval mode ``(y, None, None)``: the statistics are the running buffers.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if training:
        var, mean = torch.var_mean(xf, dim=_reduce_dims(x), unbiased=False)  # stable
        invstd = 1.0 / torch.sqrt(var + eps)
        if running_mean is not None:
            m = x.numel() // x.shape[1]
            unbiased = var * (m / (m - 1))
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
        save = (mean, invstd)
    else:
        mean = running_mean.to(acc)
        invstd = 1.0 / torch.sqrt(running_var.to(acc) + eps)
        save = (None, None)
    y = _affine((xf - _per_channel(mean, x)) * _per_channel(invstd, x), weight, bias, x, acc)
    if activation == "relu":
        y = _relu(y)
    return _like(y, x), *save


def _affine(xhat, weight, bias, x, acc):
    if weight is not None:
        xhat = xhat * _per_channel(weight.to(acc), x)
    if bias is not None:
        xhat = xhat + _per_channel(bias.to(acc), x)
    return xhat


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` cast to x's dtype, in x's memory format."""
    out = torch.empty_like(x)
    out.copy_(t)
    return out


def batch_norm_reference_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs):
    """Returns ``(dx, dweight, dbias)``, None where not needed (``needs`` = 3 booleans).

    ``mean``/``invstd`` are the saved batch statistics in training, and running_mean and
    1/sqrt(running_var + eps) in eval mode.
    """
    acc = acc_dtype(x.dtype)
    dims = _reduce_dims(x)
    xhat = (x.to(acc) - _per_channel(mean.to(acc), x)) * _per_channel(invstd.to(acc), x)
    g = dy.to(acc)
    if activation == "relu":
        g = _relu_mask(g, _affine(xhat, weight, bias, x, acc))
    sum_g = g.sum(dims)
    sum_gxhat = (g * xhat).sum(dims)
    dx = dw = db = None
    if needs[0]:
        scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
        if training:
            m = x.numel() // x.shape[1]
            g = g - _per_channel(sum_g / m, x) - xhat * _per_channel(sum_gxhat / m, x)
        dx = _like(g * _per_channel(scale, x), x)
    if needs[1] and weight is not None:
        dw = sum_gxhat.to(weight.dtype)
    if needs[2] and bias is not None:
        db = sum_g.to(bias.dtype)
    return dx, dw, db
