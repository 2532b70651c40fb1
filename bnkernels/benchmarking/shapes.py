"""Benchmark inputs as data: the normalization inputs of real networks, and edge cases.

Every shape is the input of one normalization layer, (N, C, H, W) or (N, C). The network shapes
are derived from the layer configurations below (not typed by hand), so a reader can check them
against the models:

* VGG-16 with a BatchNorm after every conv (configuration D of Simonyan & Zisserman):
  CIFAR-10 (32x32, batch 128) and ImageNet (224x224, batch 64 and 256).
* ResNet-50 (torchvision v1.5 bottlenecks: the stride sits on the 3x3 conv): ImageNet
  (224x224, stem conv 7x7/2 + maxpool, batch 64 and 256) and its CIFAR variant (32x32, stem
  conv 3x3/1, no maxpool, batch 128).

A shape used by several layers (or several networks) appears once, with every layer it stands
for in ``sources`` (``count`` layers in all).

Suites (``SUITES``): ``full`` (every network shape and edge case, fp32/fp16/bf16, NCHW and
channels_last), ``quick`` (a representative GPU subset, a few minutes) and ``cpu`` / ``cpu-quick``
(tiny shapes for the CPU smoke run: no performance claims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------- networks

# VGG-16 ("D"): channels of each 3x3 conv (each followed by BatchNorm), "M" a 2x2 max-pool.
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"]

# ResNet-50: (bottleneck width, blocks, stride of the stage's first block); expansion 4.
RESNET50 = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
EXPANSION = 4


def vgg_bn_inputs(cfg: list, batch: int, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, BatchNorm input shape) for each conv of a VGG ``cfg`` at ``size`` pixels."""
    out, hw, i = [], size, 0
    for v in cfg:
        if v == "M":
            hw //= 2
            continue
        i += 1
        out.append((f"bn{i}", (batch, v, hw, hw)))
    return out


def resnet_bn_inputs(stages: list, batch: int, size: int, stem: str
                     ) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, BatchNorm input shape) for each BatchNorm of a bottleneck ResNet.

    ``stem``: "imagenet" (conv 7x7 stride 2, then 3x3 max-pool stride 2) or "cifar" (conv 3x3
    stride 1, no pool)."""
    hw = size // 2 if stem == "imagenet" else size
    out = [("bn1", (batch, 64, hw, hw))]
    if stem == "imagenet":
        hw //= 2
    for s, (width, blocks, stride) in enumerate(stages, start=1):
        for b in range(blocks):
            prefix = f"layer{s}.{b}"
            out.append((f"{prefix}.bn1", (batch, width, hw, hw)))  # 1x1 conv, input resolution
            hw //= stride if b == 0 else 1
            out.append((f"{prefix}.bn2", (batch, width, hw, hw)))  # 3x3 conv carries the stride
            out.append((f"{prefix}.bn3", (batch, width * EXPANSION, hw, hw)))
            if b == 0:
                out.append((f"{prefix}.downsample.1", (batch, width * EXPANSION, hw, hw)))
    return out


NETWORKS: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "vgg16-cifar-b128": vgg_bn_inputs(VGG16, batch=128, size=32),
    "vgg16-imagenet-b64": vgg_bn_inputs(VGG16, batch=64, size=224),
    "vgg16-imagenet-b256": vgg_bn_inputs(VGG16, batch=256, size=224),
    "resnet50-cifar-b128": resnet_bn_inputs(RESNET50, batch=128, size=32, stem="cifar"),
    "resnet50-imagenet-b64": resnet_bn_inputs(RESNET50, batch=64, size=224, stem="imagenet"),
    "resnet50-imagenet-b256": resnet_bn_inputs(RESNET50, batch=256, size=224, stem="imagenet"),
}

# Edge cases: what the kernels' heuristics must survive. name -> (shape, why).
EDGE_CASES: dict[str, tuple[tuple[int, ...], str]] = {
    "c2-large-spatial": ((16, 2, 512, 512), "2 channels of 4M values: the split across "
                                            "programs carries all the parallelism"),
    "c2048-7x7": ((8, 2048, 7, 7), "many channels of few values (392 each)"),
    "n1": ((1, 64, 112, 112), "batch of one"),
    "large-2d": ((65536, 1024), "a large (N, C) input, as BatchNorm1d after a linear layer"),
}

# Tiny shapes for the CPU smoke run (Triton runs interpreted: ~1 s per 50k elements).
CPU_SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "cpu-4d": ((4, 3, 6, 6), "tiny (N, C, H, W)"),
    "cpu-2d": ((16, 5), "tiny (N, C)"),
    "cpu-4d-wide": ((2, 8, 16, 16), "tiny, more values per channel"),
}

# ----------------------------------------------------------------------------- dtypes, layouts

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}
LAYOUTS = ("NCHW", "channels_last")  # a 2-D (N, C) input has one layout, reported as "NC"


def layout_name(shape: tuple[int, ...], layout: str) -> str | None:
    """The layout label of ``shape`` in ``layout``, or None if the pair does not exist
    (channels_last needs a 4-D input; a 2-D input is reported as "NC" under "NCHW")."""
    if len(shape) == 2:
        return "NC" if layout == "NCHW" else None
    if layout == "channels_last" and len(shape) != 4:
        return None
    return layout


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def combo_order(dtypes, layouts) -> list[tuple[str, str]]:
    """(dtype, layout) pairs in the order a run measures them: the first dtype in the first
    layout, then the last dtype in the last layout (fp32 NCHW, then bf16 channels_last: the two
    common training setups), then the rest. A run cut short by its time limit thus has every
    shape (every model) in the most common settings."""
    pairs = [(d, lay) for d in dtypes for lay in layouts]
    return list(dict.fromkeys(pairs[:1] + pairs[-1:] + pairs))


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One normalization input shape and the layers it stands for."""

    dims: tuple[int, ...]
    sources: tuple[str, ...] = field(default=())  # "network:layer" or "edge:<name> (why)"

    @property
    def name(self) -> str:
        return "x".join(str(d) for d in self.dims)

    @property
    def count(self) -> int:
        """How many layers (over all listed networks) take this input."""
        return len(self.sources)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def channels(self) -> int:
        return self.dims[1]


def _collect(entries: list[tuple[tuple[int, ...], str]]) -> list[Shape]:
    """Merge repeated shapes (first-seen order), keeping every source."""
    sources: dict[tuple[int, ...], list[str]] = {}
    for dims, source in entries:
        sources.setdefault(tuple(dims), []).append(source)
    return [Shape(dims, tuple(src)) for dims, src in sources.items()]


def network_shapes(network: str) -> list[Shape]:
    return _collect([(dims, f"{network}:{layer}") for layer, dims in NETWORKS[network]])


def edge_shapes(table: dict = EDGE_CASES, kind: str = "edge") -> list[Shape]:
    return _collect([(dims, f"{kind}:{name} ({why})") for name, (dims, why) in table.items()])


# A GPU subset that covers each regime in minutes: early/late ResNet layers, a CIFAR layer,
# one large tensor (beyond any L2) and the edge cases.
QUICK_SHAPES = [
    (64, 256, 56, 56),    # resnet50-imagenet-b64 layer1 bn3
    (64, 2048, 7, 7),     # resnet50-imagenet-b64 layer4 bn3
    (128, 64, 32, 32),    # vgg16-cifar-b128 bn1
    (256, 256, 56, 56),   # resnet50-imagenet-b256 layer1 bn3: ~200M values, large
    (16, 2, 512, 512),    # edge: C=2
    (65536, 1024),        # edge: large 2-D
]


@dataclass(frozen=True)
class Suite:
    """Shapes, dtypes and layouts to run (the product; channels_last only for 4-D)."""

    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    lp_ps: tuple[str, ...]  # l_p norms run: "1", "2", "inf"
    description: str


def _all_shapes() -> list[Shape]:
    entries = [(dims, f"{net}:{layer}") for net, layers in NETWORKS.items()
               for layer, dims in layers]
    entries += [(dims, f"edge:{name} ({why})") for name, (dims, why) in EDGE_CASES.items()]
    return _collect(entries)


def _pick(shapes: list[Shape], dims_list: list[tuple[int, ...]]) -> tuple[Shape, ...]:
    by_dims = {s.dims: s for s in shapes}
    return tuple(by_dims[tuple(d)] for d in dims_list)


def suites() -> dict[str, Suite]:
    everything = _all_shapes()
    cpu = edge_shapes(CPU_SHAPES, kind="cpu")
    return {
        "full": Suite(tuple(everything), ("fp32", "fp16", "bf16"), LAYOUTS, ("1", "2", "inf"),
                      "every VGG-16/ResNet-50 normalization input (CIFAR b128, ImageNet b64 "
                      "and b256) and the edge cases"),
        "quick": Suite(_pick(everything, QUICK_SHAPES), ("fp32", "bf16"), LAYOUTS, ("2",),
                       "a representative subset (minutes on one GPU)"),
        "cpu": Suite(tuple(cpu), ("fp32", "bf16"), LAYOUTS, ("1", "2", "inf"),
                     "tiny CPU shapes (smoke test; no performance claims)"),
        "cpu-quick": Suite(tuple(cpu[:2]), ("fp32",), LAYOUTS, ("2",),
                           "two tiny CPU shapes (CI smoke test; no performance claims)"),
    }


def shape_groups() -> dict[str, list[Shape]]:
    """Names accepted by ``--shapes``: each network, "edge", "cpu" (besides shape names)."""
    groups = {net: network_shapes(net) for net in NETWORKS}
    groups["edge"] = edge_shapes()
    groups["cpu"] = edge_shapes(CPU_SHAPES, kind="cpu")
    return groups


def resolve_shapes(names: list[str]) -> tuple[Shape, ...]:
    """Shapes from group names ("resnet50-imagenet-b64", "edge", ...), suite names
    ("quick", "full") or shape names ("64x256x56x56", any dims, also ones not listed here)."""
    groups, all_suites = shape_groups(), suites()
    known = {s.dims: s for s in _all_shapes() + groups["cpu"]}
    picked: dict[tuple[int, ...], Shape] = {}
    for name in names:
        if name in groups:
            chosen = groups[name]
        elif name in all_suites:
            chosen = list(all_suites[name].shapes)
        else:
            try:
                dims = tuple(int(d) for d in name.lower().split("x"))
            except ValueError:
                raise ValueError(
                    f"unknown shape or shape group {name!r}; use one of "
                    f"{sorted(groups) + sorted(all_suites)} or dims like 64x256x56x56"
                ) from None
            if len(dims) < 2 or min(dims) < 1:
                raise ValueError(f"shape {name!r}: need (N, C, *spatial) with positive sizes")
            chosen = [known.get(dims, Shape(dims, ("command line",)))]
        for s in chosen:
            picked.setdefault(s.dims, s)
    return tuple(picked.values())


__all__ = ["CPU_SHAPES", "DTYPES", "EDGE_CASES", "LAYOUTS", "NETWORKS", "QUICK_SHAPES",
           "RESNET50", "VGG16", "Shape", "Suite", "combo_order", "edge_shapes", "layout_name",
           "memory_format", "network_shapes", "resolve_shapes", "resnet_bn_inputs",
           "shape_groups", "suites", "vgg_bn_inputs"]


def choose(given, allowed, what: str, command: str = "bnkernels bench") -> tuple[str, ...]:
    """``given`` as a tuple, or SystemExit naming the unknown values of ``what`` and the choice."""
    unknown = [v for v in given if v not in allowed]
    if unknown:
        raise SystemExit(f"{command}: unknown {what} {unknown}; choose from {list(allowed)}")
    return tuple(given)
