"""Drop-in normalization modules. Each subclasses its torch twin (same constructor arguments,
parameters, buffers and state_dict keys) and runs bnkernels' ops."""

from __future__ import annotations

import torch
from torch import nn

from .functional import ACTIVATIONS, batch_norm


class _BatchNormMixin:
    """The forward of torch's ``_BatchNorm``, calling :func:`bnkernels.batch_norm`."""

    def _init_activation(self, activation):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {ACTIVATIONS}, "
                             f"got {activation!r}")
        self.activation = activation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input has {input.shape[1]} channels (shape "
                f"{tuple(input.shape)}) but the module was built for {self.num_features}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight, self.bias, bn_training, factor, self.eps, self.activation)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on bnkernels' kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_activation(activation)


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on bnkernels' kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_activation(activation)


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on bnkernels' kernels; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_activation(activation)
