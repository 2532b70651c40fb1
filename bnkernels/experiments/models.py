"""The paper's networks: a VGG-like CNN for CIFAR-10 and the 25-layer deep linear network.

Every normalization layer comes from :func:`make_norm`, so a network is switched between the
standard (no normalization), BatchNorm, "noisy" BatchNorm and l_p variants by one name. Weight
layers (``nn.Linear`` / ``nn.Conv*``) are the paper's "layers", numbered from 1 in forward order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import bnkernels as bnk

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
    noise: bnk.NoiseConfig = bnk.NoiseConfig()  # noisy BatchNorm's distribution (Algorithm 1)
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
        return getattr(bnk, f"BatchNorm{dim}d")(num_features, **common)
    if name == "torch":
        return getattr(nn, f"BatchNorm{dim}d")(num_features, **common)
    if name == "noisy":
        return getattr(bnk, f"NoisyBatchNorm{dim}d")(num_features, **common,
                                                    noise=options.noise, seed=seed)
    if name in LP:
        return getattr(bnk, f"LpNorm{dim}d")(num_features, LP[name], **common,
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


class DeepLinear(nn.Sequential):
    """The paper's deep linear network: ``depth`` bias-free ``dim x dim`` linear layers, the
    normalization after every layer but the last (the paper does not say where; this is the
    default of EXPERIMENTS.md), no non-linearity, Glorot initialization."""

    def __init__(self, depth: int = 25, dim: int = 10, norm: str = "none", seed: int = 0,
                 norm_options: NormOptions | None = None):
        if depth < 1:
            raise ValueError(f"DeepLinear: depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dim, dim, bias=False))
            if i < depth - 1:
                layers.append(make_norm(norm, dim, 1, seed=seed * 1000 + i + 1,
                                        options=norm_options))
        super().__init__(*layers)
        glorot_init_(self)


def build_model(kind: str, norm: str, *, arch: str = "vgg16", width: float = 1.0,
                num_classes: int = 10, in_channels: int = 3, depth: int = 25, dim: int = 10,
                seed: int = 0, norm_options: NormOptions | None = None) -> nn.Module:
    """A fresh model, initialized from ``torch.manual_seed(seed)``: "vgg" or "dln"."""
    torch.manual_seed(seed)
    if kind == "vgg":
        return VGG(arch, norm, width, num_classes, in_channels, seed, norm_options)
    if kind == "dln":
        return DeepLinear(depth, dim, norm, seed, norm_options)
    raise ValueError(f"build_model: unknown model kind {kind!r}; choose 'vgg' or 'dln'")


class Snapshot:
    """A model's parameters, buffers, train/eval flags and the RNG state, to put back exactly.

    Measurements (ICS, landscape probes, activation samples) run extra forwards and move the
    weights; every forward in training mode also moves the running statistics, the batch
    counter and noisy BatchNorm's step. They restore the buffers before each forward (so every
    evaluation sees the same statistics and the same noise) and everything at the end."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = [(p, p.detach().clone()) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.rng = torch.get_rng_state()
        self.cuda_rng = (torch.cuda.get_rng_state_all()
                         if torch.cuda.is_available() and torch.cuda.is_initialized() else None)

    @torch.no_grad()
    def restore_buffers(self) -> None:
        for b, saved in self.buffers:
            b.copy_(saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.params:
            p.copy_(saved)
        self.restore_buffers()
        for m, mode in self.modes:
            m.training = mode

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def forward_layout(model: nn.Module, run):
    """Call ``run()`` (a forward of ``model``) and return ``(layers, blocks, out)``: the weight
    layers in forward order; each one's "layer" parameters (its own, plus those of the
    parameterized modules that run after it and before the next weight layer: its
    normalization's weight and bias; modules with parameters that run before the first weight
    layer count to layer 1); and what ``run()`` returned."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(module, args):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    layers = [m for m in order if is_weight_layer(m)]
    blocks: list[list[nn.Parameter]] = [[] for _ in layers]
    k = 0
    for m in order:
        if is_weight_layer(m):
            k = layers.index(m)
        if blocks:
            blocks[k].extend(p for p in m.parameters(recurse=False) if p.requires_grad)
    return layers, blocks, out
