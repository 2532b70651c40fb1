"""Run configurations: :class:`RunConfig` (everything that defines one training run), the
paper's setups and the small ones, the losses, and the device choice."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from . import landscape

LOSSES = ("cross_entropy", "sum_squared", "half_sum_squared")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Defaults: the paper's VGG on CIFAR-10."""

    # --- the network
    model: str = "vgg"  # "vgg" (image classifier) or "dln" (deep linear network)
    arch: str = "vgg16"  # VGG depth: vgg11 | vgg13 | vgg16 | vgg19 (13 conv layers for vgg16)
    width: float = 1.0  # VGG channel multiplier (1.0: 64..512 channels)
    depth: int = 25  # DLN: number of square linear layers
    dim: int = 10  # DLN: layer width = input = output dimension
    norm: str = "batchnorm"  # none | batchnorm | noisy | l1 | l2 | linf | torch
    centered: bool = False  # l_p norms: scale of x - mean instead of x
    # --- the data
    dataset: str = "cifar10"  # cifar10 | digits (bundled, offline) | gaussian (DLN regression)
    data_dir: str | None = None  # CIFAR-10 folder (holding cifar-10-batches-py/)
    image_size: int = 32  # digits: pixels per side after upsampling the 8x8 images
    num_samples: int = 1000  # gaussian: samples in the (full) batch
    # --- optimization (plain SGD)
    loss: str = "cross_entropy"  # cross_entropy (batch mean) | sum_squared | half_sum_squared
    batch_size: int = 128  # samples per step; >= the dataset size means full-batch GD
    lr: float = 0.1  # SGD step size
    momentum: float = 0.0  # SGD momentum (the paper: none)
    weight_decay: float = 0.0  # L2 penalty (the paper: none)
    steps: int = 15_000  # optimizer steps (15k = ~38 CIFAR-10 epochs at batch 128)
    seed: int = 0  # initialization, data order, noise, probe directions
    # --- logging and measurements (every = 0 turns one off)
    log_every: int = 100  # steps between per-minibatch loss/accuracy records
    test_every: int = 1_000  # steps between test evaluations (also after the last step)
    ics_every: int = 100  # steps between ICS measurements (Definition 2.1)
    ics_layers: tuple[int, ...] = (5, 10)  # weight layers measured (from 1, forward order)
    landscape_every: int = 100  # steps between landscape probes
    landscape_steps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # step lengths eta (absolute)
    landscape_directions: tuple[str, ...] = ("gradient",)  # each probed: gradient | random
    hessian_every: int = 0  # steps between top-Hessian-eigenvalue measurements (not in paper)
    hessian_iters: int = 20  # Hessian-vector products per Lanczos measurement, about at most
    hessian_tol: float = 1e-3  # Lanczos' relative accuracy of both ends of the spectrum
    hessian_trace_samples: int = 0  # Hutchinson samples of tr(H) per measurement (0: none)
    act_every: int = 100  # steps t at which activations are sampled (at t and t + 1)
    act_layers: tuple[int, ...] = (2, 7, 12)  # weight layers sampled (early / middle / late)
    act_units: int = 3  # random channels sampled per layer
    checkpoint_every: int = 1_000  # steps between checkpoints (also after the last step)
    keep_checkpoints: int = 2  # most recent checkpoints kept

    def __post_init__(self):
        if self.model not in ("vgg", "dln"):
            raise ValueError(f"RunConfig.model must be 'vgg' or 'dln', got {self.model!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"RunConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        bad = set(self.landscape_directions) - set(landscape.DIRECTIONS)
        if bad:
            raise ValueError("RunConfig.landscape_directions must be among "
                             f"{landscape.DIRECTIONS}, got {sorted(bad)}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints",
                     "image_size", "hessian_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"RunConfig: unknown fields {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The paper's setups (EXPERIMENTS.md) and the small ones used by `--quick` and the tests.
PAPER_VGG = RunConfig()
# The DLN's loss: half the sum of squares over the 1000 samples. The paper writes
# ||f(x) - A x||^2 summed, but its plotted losses start at 3.5e4-5.6e4, which is half of the
# sum at initialization (E||A x||^2 = 100 per sample: 1e5); TensorFlow's l2_loss halves.
PAPER_DLN = RunConfig(
    model="dln", norm="none", dataset="gaussian", loss="half_sum_squared", batch_size=1000,
    lr=1e-6, steps=10_000, log_every=50, test_every=0, ics_every=50, ics_layers=(9, 17),
    landscape_every=50, landscape_steps=(1e-8, 1e-7, 1e-6, 1e-5, 10 ** -4.5), act_every=50,
    act_layers=(9, 17), checkpoint_every=1_000)

CONFIGS: dict[str, RunConfig] = {
    # VGG-16 on CIFAR-10, 15k steps of SGD, batch 128, lr 0.1 (Figs. 1-4, 7, 10, 11, 13, 14).
    "vgg": PAPER_VGG,
    # the 25-layer 10x10 deep linear network, full-batch GD, lr 1e-6, 10k steps (Figs. 3, 9, 12).
    "dln": PAPER_DLN,
    # what `reproduce --quick` runs on a 2-core CPU: VGG-11 at 1/8 width on the bundled digits,
    # batch 64 (the paper: 128; half the cost of a step, so that three seeds fit), lr 0.05:
    # at this scale the standard network is stable at 0.05 and not at 0.1 (it leaves its
    # chance-level plateau and falls back to it), as the paper's is at 0.1 and not at 0.5.
    # VGG-11 rather than VGG-13: its standard network leaves the plateau within ~20-90
    # steps instead of ~50-150, so the landscape probes see it train. ICS at conv layers #3
    # and #6, the relative depths of the paper's #5 and #10 in a 13-conv stack. Landscape
    # probes every 15 steps at the paper's step lengths relative to the lr, [1/2, 4] x lr.
    "vgg-quick": replace(PAPER_VGG, arch="vgg11", width=0.125, dataset="digits",
                         batch_size=64, lr=0.05, steps=300, log_every=10, test_every=50,
                         ics_every=20, ics_layers=(3, 6), landscape_every=15,
                         landscape_steps=(0.025, 0.05, 0.1, 0.2),
                         landscape_directions=("gradient", "random"), hessian_every=100,
                         hessian_tol=1e-2, act_every=10, act_layers=(2, 5, 8),
                         checkpoint_every=100),
    # the full-size DLN for 1,000 steps (the paper: 10,000), probed every 50 steps as the
    # paper does.
    "dln-quick": replace(PAPER_DLN, steps=1_000, log_every=20, ics_every=50,
                         landscape_every=50, hessian_every=250, hessian_tol=1e-2,
                         act_every=50, checkpoint_every=500),
    # seconds-long runs for smoke tests.
    "tiny": replace(PAPER_VGG, arch="vgg11", width=1 / 32, dataset="digits", image_size=16,
                    batch_size=16, steps=6, log_every=1, test_every=3, ics_every=3,
                    ics_layers=(2, 3), landscape_every=3, hessian_every=3, hessian_iters=20,
                    act_every=3, act_layers=(1, 2), checkpoint_every=2),
    "dln-tiny": replace(PAPER_DLN, steps=6, log_every=1, ics_every=3, landscape_every=3,
                        hessian_every=3, hessian_iters=20, act_every=3, checkpoint_every=2),
}



# ----------------------------------------------------------------------------- helpers


def sum_squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over samples and outputs of (out - target)^2: the DLN's ||f(x) - A x||^2 summed."""
    return (out - target).square().sum()


def half_sum_squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half of :func:`sum_squared_loss` (TensorFlow's ``l2_loss`` convention; the paper's
    plotted DLN losses start near 3.5e4-5.6e4, about half of E||A x||^2 * 1000 = 1e5)."""
    return 0.5 * (out - target).square().sum()


def make_loss(name: str):
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "sum_squared":
        return sum_squared_loss
    if name == "half_sum_squared":
        return half_sum_squared_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_id(name: str, cfg: RunConfig) -> str:
    """A readable, deterministic folder name: <config>-<norm>-lr<lr>-seed<seed>."""
    return f"{name}-{cfg.norm}-lr{cfg.lr:g}-seed{cfg.seed}"


def config_with(cfg: RunConfig, **overrides) -> RunConfig:
    """``cfg`` with the non-None ``overrides`` applied (tuples from lists / comma strings)."""
    types = {f.name: f for f in dataclasses.fields(cfg)}
    clean = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in types:
            raise ValueError(f"unknown config field {k!r}")
        if isinstance(getattr(cfg, k), tuple) and not isinstance(v, tuple):
            v = tuple(v) if isinstance(v, list) else v
        clean[k] = v
    return replace(cfg, **clean)


