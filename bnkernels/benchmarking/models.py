"""The networks of the end-to-end benchmark (``e2e`` section of ``bnkernels bench``).

* VGG-16 for CIFAR-10 with a BatchNorm after each of its 13 convs: the experiments' own
  :class:`bnkernels.models.VGG` (``norm="torch"``: torch's BatchNorm2d), which needs
  32x32 inputs (five 2x2 pools).
* ResNet-50 for ImageNet, written here (torchvision is not a dependency): the v1.5 bottleneck
  (the stride on the 3x3 conv), stages ``shapes.RESNET50`` = [3, 4, 6, 3] blocks, the 7x7/2
  stem conv and 3x3/2 max-pool, torchvision's module names (``layer1.0.bn1``,
  ``layer1.0.downsample.1``) and initialization. At width 1 it has torchvision's 25,557,032
  parameters. ``width`` scales every channel count (tiny models for the CPU smoke run).

Both come with torch's ``nn.BatchNorm2d``; the benchmark converts a copy with
``bnkernels.convert(model, to="batchnorm")``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import VGG
from .shapes import EXPANSION, RESNET50


def _channels(c: int, width: float) -> int:
    return max(1, round(c * width))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), BatchNorm after each conv, ReLU, and the
    identity or a 1x1 conv + BatchNorm shortcut."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (ImageNet stem); ``width`` scales all channels (1: the real network)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"ResNet50: width must be > 0, got {width}")
        c = _channels(64, width)
        self.conv1 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for s, (planes, blocks, stride) in enumerate(RESNET50, start=1):
            w = _channels(planes, width)
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(c, w, stride if b == 0 else 1))
                c = w * EXPANSION
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(arch: str, num_classes: int, width: float = 1.0) -> nn.Module:
    """A fresh "vgg16" or "resnet50" with torch's BatchNorm2d (seed the RNG first)."""
    if arch == "vgg16":
        return VGG("vgg16", norm="torch", width=width, num_classes=num_classes)
    if arch == "resnet50":
        return ResNet50(num_classes, width)
    raise ValueError(f"unknown model {arch!r}; choose 'vgg16' or 'resnet50'")


def batch_norm_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, input shape) of every BatchNorm in forward order, from one forward of
    ``x`` (on the meta device this costs nothing)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.append((name, tuple(args[0].shape))))
        for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


__all__ = ["Bottleneck", "ResNet50", "batch_norm_inputs", "build"]
