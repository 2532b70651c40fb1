"""The paper's networks: a VGG-like CNN for CIFAR-10 (defined in :mod:`bnkernels.models`, shared
with the benchmarks) and the 25-layer deep linear network.

Every normalization layer comes from :func:`make_norm`, so a network is switched between the
standard (no normalization), BatchNorm, "noisy" BatchNorm and l_p variants by one name. Weight
layers (``nn.Linear`` / ``nn.Conv*``) are the paper's "layers", numbered from 1 in forward order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import (  # noqa: F401  (re-exported: the experiments' names)
    LP,
    NORMS,
    VGG,
    VGG_CONFIGS,
    NormOptions,
    glorot_init_,
    is_weight_layer,
    make_norm,
    weight_layers,
)


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
