"""The reproduction's suites: which runs make up each mode (quick, gpu, full, tiny), over which
seeds, scaled to other step counts, and the configuration of every run."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .config import CONFIGS, PAPER_DLN, PAPER_VGG, RunConfig
from .plots import run_name

GPU_STEPS = 3_000
"""VGG steps of the ``gpu`` mode: 3 seeds x 8 VGG-16 runs, with measurements, estimated to fit
in about ten minutes on one H100/H200 with several runs sharing the GPU (not yet timed on one;
``--steps`` changes it)."""


@dataclass(frozen=True)
class SuiteConfig:
    """Which runs make up the reproduction, over which seeds, and the windows the claims read."""

    vgg: RunConfig  # base VGG run (norm, lr and seed are set per run)
    dln: RunConfig  # base DLN run
    seeds: tuple[int, ...] = (0,)  # every run is trained once per seed
    vgg_norms: tuple[str, ...] = ("none", "batchnorm", "noisy", "l1", "l2", "linf")  # at vgg.lr
    vgg_high_lr: float = 0.5  # Fig. 1: the standard network fails here, BatchNorm trains
    vgg_high_lr_norms: tuple[str, ...] = ("none", "batchnorm")
    dln_norms: tuple[str, ...] = ("none", "batchnorm", "l1", "l2", "linf")  # at lr 1e-6
    dln_low_lr: float = 1e-7  # Fig. 3's DLN ICS
    dln_low_lr_norms: tuple[str, ...] = ("none", "batchnorm")
    dln_low_lr_steps: int | None = None  # shorter ICS-only DLN runs (schedule scaled along)
    hessian_norms: tuple[str, ...] = ("none", "batchnorm", "l1", "l2", "linf")  # curvature,
    #                                                      at the base lr of VGG and DLN
    noisy_steps: int | None = None  # a shorter noisy-BN run (its CPU noise generator is slow)
    high_lr_steps: int | None = None  # shorter high-lr runs (they measure only accuracy)
    early_step: int = 500  # "early in training": the paper's first tabulated step


SUITES: dict[str, SuiteConfig] = {
    "full": SuiteConfig(replace(PAPER_VGG, landscape_directions=("gradient", "random"),
                                hessian_every=1_000, hessian_trace_samples=8),
                        replace(PAPER_DLN, hessian_every=500, hessian_trace_samples=8),
                        seeds=(0, 1, 2, 3, 4)),
    # one H100/H200 in about ten minutes: VGG-16 at full width, the paper's SGD, lrs and batch,
    # for GPU_STEPS steps; the DLN on the CPU at the paper's 10,000 steps.
    "gpu": SuiteConfig(replace(PAPER_VGG, dataset="digits", steps=GPU_STEPS, test_every=500,
                               landscape_directions=("gradient", "random"), hessian_every=500,
                               hessian_trace_samples=8, checkpoint_every=500),
                       replace(PAPER_DLN, hessian_every=500, hessian_trace_samples=8),
                       seeds=(0, 1, 2)),
    # 2-core CPU, < 10 minutes: VGG-11 at 1/8 width on the digits, batch 64, lr 0.05, 300 steps
    # (noisy BN 100: its CPU noise generator costs 10x a BatchNorm step; the paper's high lr
    # 0.5, which measures only accuracy, 150); the full-size DLN for 1,000 steps (the lr-1e-7
    # ICS runs 500: the paper's 10,000 do not change their verdict, docs/scale-checks.md);
    # three seeds. See CONFIGS["vgg-quick"] for why these choices.
    "quick": SuiteConfig(CONFIGS["vgg-quick"], CONFIGS["dln-quick"], seeds=(0, 1, 2),
                         noisy_steps=100, high_lr_steps=150, dln_low_lr_steps=500,
                         early_step=100),
    # seconds: a smoke test of the whole pipeline (tests, CLI checks); claims are meaningless.
    "tiny": SuiteConfig(CONFIGS["tiny"], CONFIGS["dln-tiny"], early_step=3),
}

_SCHEDULES = ("log_every", "test_every", "ics_every", "landscape_every", "hessian_every",
              "act_every", "checkpoint_every")


def scale_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """``cfg`` for ``steps`` steps with every measurement schedule scaled in proportion
    (at least every step; a schedule that is off stays off): a scaled-down (or up) run that
    measures as often, relative to its length."""
    if steps < 1:
        raise ValueError(f"scale_steps: steps must be >= 1, got {steps}")
    f = steps / cfg.steps
    return replace(cfg, steps=steps, **{k: max(1, round(getattr(cfg, k) * f))
                                        for k in _SCHEDULES if getattr(cfg, k) > 0})


def scaled_suite(suite: SuiteConfig, *, steps: int | None = None, dln_steps: int | None = None,
                 seeds: tuple[int, ...] | None = None, vgg: dict | None = None,
                 dln: dict | None = None) -> SuiteConfig:
    """``suite`` with overrides: VGG / DLN step counts (schedules, the noisy run's length and
    the early window scaled with them), seeds, and fields of the base VGG / DLN configs."""
    if vgg:
        suite = replace(suite, vgg=replace(suite.vgg, **vgg))
    if dln:
        suite = replace(suite, dln=replace(suite.dln, **dln))
    if steps is not None:
        f = steps / suite.vgg.steps
        suite = replace(suite, vgg=scale_steps(suite.vgg, steps),
                        noisy_steps=(max(1, round(suite.noisy_steps * f))
                                     if suite.noisy_steps else None),
                        high_lr_steps=(max(1, round(suite.high_lr_steps * f))
                                       if suite.high_lr_steps else None),
                        early_step=max(1, round(suite.early_step * f)))
    if dln_steps is not None:
        f = dln_steps / suite.dln.steps
        suite = replace(suite, dln=scale_steps(suite.dln, dln_steps),
                        dln_low_lr_steps=(max(1, round(suite.dln_low_lr_steps * f))
                                          if suite.dln_low_lr_steps else None))
    if seeds is not None:
        if not seeds:
            raise ValueError("scaled_suite: seeds must not be empty")
        suite = replace(suite, seeds=tuple(seeds))
    return suite


def suite_to_dict(suite: SuiteConfig) -> dict:
    d = {f.name: getattr(suite, f.name) for f in fields(suite)}
    d["vgg"], d["dln"] = suite.vgg.to_dict(), suite.dln.to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def suite_from_dict(d: dict) -> SuiteConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d["vgg"], d["dln"] = RunConfig.from_dict(d["vgg"]), RunConfig.from_dict(d["dln"])
    return SuiteConfig(**d)


def suite_runs(suite: SuiteConfig) -> dict[str, RunConfig]:
    """Run name -> config, for every run of ``suite`` and every seed. Each run measures only
    what a figure or claim reads from it (ICS, landscape, curvature and activations cost
    extra forwards and backwards)."""
    off = dict(ics_every=0, landscape_every=0, hessian_every=0, act_every=0)
    vgg, dln = suite.vgg, suite.dln
    base: dict[tuple[str, str, float], RunConfig] = {}
    for norm in suite.vgg_norms:
        cfg = replace(vgg, norm=norm)
        if norm == "noisy":  # Figs. 2, 7, 8: training and activations
            cfg = replace(cfg, ics_every=0, landscape_every=0,
                          steps=suite.noisy_steps or cfg.steps)
        elif norm not in ("none", "batchnorm"):  # l_p, Figs. 11, 13, 14: no ICS
            cfg = replace(cfg, ics_every=0, landscape_directions=("gradient",))
        base[("vgg", norm, vgg.lr)] = cfg
    high = scale_steps(vgg, suite.high_lr_steps) if suite.high_lr_steps else vgg
    for norm in suite.vgg_high_lr_norms:  # Fig. 1: training and test accuracy
        base[("vgg", norm, suite.vgg_high_lr)] = replace(high, norm=norm, lr=suite.vgg_high_lr,
                                                         **off)
    for norm in suite.dln_norms:  # Figs. 9, 12, 13: loss and landscape
        base[("dln", norm, dln.lr)] = replace(dln, norm=norm, ics_every=0)
    low = scale_steps(dln, suite.dln_low_lr_steps) if suite.dln_low_lr_steps else dln
    for norm in suite.dln_low_lr_norms:  # Fig. 3: ICS
        base[("dln", norm, suite.dln_low_lr)] = replace(
            low, norm=norm, lr=suite.dln_low_lr, landscape_every=0, hessian_every=0,
            act_every=0)
    runs: dict[str, RunConfig] = {}
    for (model, norm, lr), cfg in base.items():
        if norm not in suite.hessian_norms or lr != (vgg.lr if model == "vgg" else dln.lr):
            cfg = replace(cfg, hessian_every=0)
        for seed in suite.seeds:
            runs[run_name(model, norm, lr, seed)] = replace(cfg, seed=seed)
    return runs


def _cost(cfg: RunConfig) -> float:
    """A rough relative cost (from CPU timings of the quick suite), to start the slowest runs
    first."""
    per_step = {"noisy": 6.0, "none": 0.5}.get(cfg.norm, 1.0)
    if cfg.model == "dln":
        per_step *= 0.4
    return cfg.steps * per_step

