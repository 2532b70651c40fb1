"""Functional ops, ``torch.nn.functional``-style: validate, pick a backend, run autograd."""

from __future__ import annotations

import math

import torch

from . import backends
from .backends._base import FLOAT_DTYPES
from .ops import BatchNormFunction

ACTIVATIONS = (None, "relu")


def _check_input(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{op}: expected an input of shape (N, C, *spatial) with 2 or more dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: unsupported input dtype {x.dtype}; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")


def _check_per_channel(op: str, x: torch.Tensor, **tensors) -> None:
    C = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the input is on {x.device}; "
                "all tensors must be on the same device")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() != C:
            raise ValueError(
                f"{op}: {name} should contain {C} elements (one per channel of the input, "
                f"shape {tuple(x.shape)}), not {t.numel()}")


def _check_training_size(x: torch.Tensor) -> None:
    """As PyTorch: statistics of a single value per channel are meaningless."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _check_scalars(op: str, momentum, eps, activation) -> None:
    if momentum is None:
        raise ValueError(
            f"{op}: momentum=None (cumulative moving average) needs the number of batches seen; "
            "the modules (bnkernels.BatchNorm2d, ...) track it, or pass "
            "momentum=1/num_batches yourself")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    if not (float(eps) > 0.0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    Normalizes each channel of ``x`` (N, C, *spatial) over N and the spatial dims. In training
    the batch statistics are used and, if given, ``running_mean``/``running_var`` are updated in
    place (unbiased variance, ``momentum`` as in PyTorch); in eval mode the running statistics
    are used. ``activation="relu"`` fuses a ReLU on the output. Statistics are accumulated in
    fp32 (fp64 for fp64 input); the output has x's dtype and memory format.
    """
    op = "batch_norm"
    _check_input(op, x)
    _check_per_channel(op, x, running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    _check_scalars(op, momentum, eps, activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var must be given in eval mode "
                         "(training=False)")
    if training:
        _check_training_size(x)
    if x.numel() == 0:
        return _empty_batch(x, weight, bias, activation)
    be = backends.select(op, x)
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), activation, be)


def _empty_batch(x, weight, bias, activation):
    """As PyTorch: an empty batch gives an empty output, statistics untouched, and (zero)
    gradients still reach weight and bias."""
    out = x.clone()
    if weight is not None:
        out = out * weight.reshape(1, -1, *([1] * (x.dim() - 2)))
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return torch.relu(out) if activation == "relu" else out
