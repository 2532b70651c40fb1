"""Networks built on bnkernels' normalization layers, shared by the experiments and the
benchmarks: the VGG family (the paper's CNN for CIFAR-10) and :func:`make_norm`, which switches a
network between no normalization, BatchNorm, noisy BatchNorm, l_p normalizations and torch's
own BatchNorm by one name.

Weight layers (``nn.Linear`` / ``nn.Conv*``) are the paper's "layers", numbered from 1 in
forward order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import nn as bnn
from .noise import NoiseConfig

NORMS = ("none", "batchnorm", "noisy", "l1", "l2", "linf", "torch")
"""Names :func:`make_norm` understands. "none" is the paper's standard network; "torch" is
torch.nn's own BatchNorm (an oracle for ours)."""

LP = {"l1": 1, "l2": 2, "linf": math.inf}

# The VGG family (Simonyan & Zisserman), CIFAR variant: numbers are conv output channels at
# width 1, "M" a 2x2 max-pool; five pools take 32x32 inputs to 1x1 before the classifier
# (smaller inputs reach 1x1 earlier and stay there).
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


@dataclass(frozen=True)
class NormOptions:
    """Options of the normalization layers beyond their name (defaults: the paper's)."""

    eps: float = 1e-5  # added to the variance / l_p scale
    momentum: float = 0.1  # running-statistics update factor
    noise: NoiseConfig = NoiseConfig()  # noisy BatchNorm's distribution (Algorithm 1)
    centered: bool = False  # l_p: scale of x - mean instead of x ("before shifting the mean")


def make_norm(name: str, num_features: int, dim: int = 2, *, seed: int = 0,
              options: NormOptions | None = None) -> nn.Module:
    """The normalization layer called ``name`` for ``num_features`` channels.

    ``dim`` 1 for (N, C) / (N, C, L) inputs, 2 for images. ``seed`` keys the noise of "noisy"
    (give each layer its own). "none" returns ``nn.Identity`` (the standard network)."""
    options = options or NormOptions()
    if dim not in (1, 2, 3):
        raise ValueError(f"make_norm: dim must be 1, 2 or 3, got {dim}")
    common = dict(eps=options.eps, momentum=options.momentum)
    if name == "none":
        return nn.Identity()
    if name == "batchnorm":
        return getattr(bnn, f"BatchNorm{dim}d")(num_features, **common)
    if name == "torch":
        return getattr(nn, f"BatchNorm{dim}d")(num_features, **common)
    if name == "noisy":
        return getattr(bnn, f"NoisyBatchNorm{dim}d")(num_features, **common,
                                                    noise=options.noise, seed=seed)
    if name in LP:
        return getattr(bnn, f"LpNorm{dim}d")(num_features, LP[name], **common,
                                            centered=options.centered)
    raise ValueError(f"make_norm: unknown normalization {name!r}; choose one of {NORMS}")


def glorot_init_(model: nn.Module) -> nn.Module:
    """Glorot (Xavier) uniform initialization of every weight layer; biases zero. Norm layers
    keep their own initialization (weight 1, bias 0)."""
    for m in model.modules():
        if is_weight_layer(m):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The weight layers (Linear / Conv) in registration order, which is forward order for the
    networks built here; layer i of the paper is ``weight_layers(model)[i - 1]``."""
    return [m for m in model.modules() if is_weight_layer(m)]


class VGG(nn.Module):
    """VGG-like CNN: [conv3x3 -> norm -> ReLU]* with max-pools, then one linear classifier.

    ``features`` is a flat Sequential (conv, norm, ReLU, ..., MaxPool), so the module after each
    conv is its normalization (``nn.Identity`` for the standard network)."""

    def __init__(self, arch: str = "vgg16", norm: str = "batchnorm", width: float = 1.0,
                 num_classes: int = 10, in_channels: int = 3, seed: int = 0,
                 norm_options: NormOptions | None = None):
        super().__init__()
        if arch not in VGG_CONFIGS:
            raise ValueError(f"VGG: unknown arch {arch!r}; choose one of {list(VGG_CONFIGS)}")
        if not width > 0:
            raise ValueError(f"VGG: width must be > 0, got {width}")
        layers: list[nn.Module] = []
        c_in, n_conv = in_channels, 0
        for v in VGG_CONFIGS[arch]:
            if v == "M":
                # ceil_mode: a 1x1 map stays 1x1, so inputs smaller than 32x32 (e.g. 16x16
                # digits) fit the five pools; on 32x32 inputs it is the plain 2x2 pool.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = max(1, round(v * width))
            n_conv += 1
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1),
                       make_norm(norm, c_out, 2, seed=seed * 1000 + n_conv,
                                 options=norm_options),
                       nn.ReLU(inplace=False)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        glorot_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
