"""The reproduction as one batch: the runs behind Figs. 1-4 and 7-14, the figures, and
``report.md`` with a claims table (each claim of the paper, its figure and number, what was
measured here, and whether it held by a stated criterion, computed from the saved metrics).

``reproduce(out, quick=True)`` is the README's main job: VGG-13 at 1/8 width on the bundled
digits data for a few hundred steps, and the full-size deep linear network for a shorter run,
on a 2-core CPU in minutes. ``quick=False`` runs the paper's setups (VGG-16 on CIFAR-10 for
15k steps, the DLN for 10k) and wants a GPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .activations import moment_changes
from .plots import LABELS, Run, load_suite, make_figures, run_name
from .train import CONFIGS, PAPER_DLN, PAPER_VGG, RunConfig, default_jobs, run_many, versions


@dataclass(frozen=True)
class SuiteConfig:
    """Which runs make up the reproduction, and the windows the claims read."""

    vgg: RunConfig  # base VGG run (norm and lr are set per run)
    dln: RunConfig  # base DLN run
    vgg_norms: tuple[str, ...] = ("none", "batchnorm", "noisy", "l1", "l2", "linf")  # at lr 0.1
    vgg_high_lr: float = 0.5  # Fig. 1: the standard network fails here, BatchNorm trains
    vgg_high_lr_norms: tuple[str, ...] = ("none", "batchnorm")
    dln_norms: tuple[str, ...] = ("none", "batchnorm", "l1", "l2", "linf")  # at lr 1e-6
    dln_low_lr: float = 1e-7  # Fig. 3's DLN ICS
    dln_low_lr_norms: tuple[str, ...] = ("none", "batchnorm")
    noisy_steps: int | None = None  # a shorter noisy-BN run (its CPU noise generator is slow)
    early_step: int = 500  # "early in training": the paper's first tabulated step


SUITES: dict[str, SuiteConfig] = {
    "full": SuiteConfig(replace(PAPER_VGG, landscape_directions=("gradient", "random")),
                        PAPER_DLN),
    # 2-core CPU, < 10 minutes: VGG-13 (layers #5 and #10 as in the paper's ICS figure) at 1/8
    # width on the digits, 200 steps (noisy BN 100); the full-size DLN for 2,000 steps.
    "quick": SuiteConfig(CONFIGS["vgg-quick"], CONFIGS["dln-quick"], noisy_steps=100,
                         early_step=100),
    # seconds: a smoke test of the whole pipeline (tests, CLI checks); claims are meaningless.
    "tiny": SuiteConfig(CONFIGS["tiny"], CONFIGS["dln-tiny"], early_step=3),
}


def suite_to_dict(suite: SuiteConfig) -> dict:
    d = {f.name: getattr(suite, f.name) for f in fields(suite)}
    d["vgg"], d["dln"] = suite.vgg.to_dict(), suite.dln.to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def suite_from_dict(d: dict) -> SuiteConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d["vgg"], d["dln"] = RunConfig.from_dict(d["vgg"]), RunConfig.from_dict(d["dln"])
    return SuiteConfig(**d)


def suite_runs(suite: SuiteConfig) -> dict[str, RunConfig]:
    """Run name -> config, for every run of ``suite``. Each run measures only what a figure or
    claim reads from it (ICS, landscape and activations cost extra forwards and backwards)."""
    off = dict(ics_every=0, landscape_every=0, act_every=0)
    runs: dict[str, RunConfig] = {}
    vgg, dln = suite.vgg, suite.dln
    for norm in suite.vgg_norms:
        cfg = replace(vgg, norm=norm, lr=0.1)
        if norm == "noisy":  # Figs. 2, 7, 8: training and activations
            cfg = replace(cfg, ics_every=0, landscape_every=0,
                          steps=suite.noisy_steps or cfg.steps)
        elif norm not in ("none", "batchnorm"):  # l_p, Figs. 11, 13, 14: no ICS
            cfg = replace(cfg, ics_every=0, landscape_directions=("gradient",))
        runs[run_name("vgg", norm, 0.1)] = cfg
    for norm in suite.vgg_high_lr_norms:  # Fig. 1: training and test accuracy
        runs[run_name("vgg", norm, suite.vgg_high_lr)] = replace(
            vgg, norm=norm, lr=suite.vgg_high_lr, **off)
    for norm in suite.dln_norms:  # Figs. 9, 12, 13: loss and landscape
        runs[run_name("dln", norm, dln.lr)] = replace(dln, norm=norm, ics_every=0, act_every=0)
    for norm in suite.dln_low_lr_norms:  # Fig. 3: ICS
        runs[run_name("dln", norm, suite.dln_low_lr)] = replace(
            dln, norm=norm, lr=suite.dln_low_lr, landscape_every=0, act_every=0)
    return runs


def reproduce(out: str | os.PathLike, mode: str = "quick", jobs: int | None = None,
              device: str = "auto", overrides: dict | None = None,
              progress: bool = True) -> Path:
    """Run (or resume) the suite ``mode`` (quick, full or tiny) in ``out``, draw the figures
    and write ``out/report.md``. ``overrides`` (e.g. dataset, data_dir) apply to the VGG
    runs' config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if mode not in SUITES:
        raise ValueError(f"reproduce: mode must be one of {list(SUITES)}, got {mode!r}")
    suite = SUITES[mode]
    if overrides:
        suite = replace(suite, vgg=replace(suite.vgg, **overrides))
    runs = suite_runs(suite)
    meta = {"mode": mode, "suite": suite_to_dict(suite),
            "runs": {name: {"dir": name, "config": cfg.to_dict()} for name, cfg in runs.items()}}
    (out / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    jobs = jobs or default_jobs(device)
    # Longest first, so the slowest run does not start last.
    order = sorted(runs.items(), key=lambda kv: -_cost(kv[1]))
    t0 = time.time()
    run_many([(cfg, out / name) for name, cfg in order], jobs=jobs, device=device,
             progress=progress)
    write_report(out, train_seconds=time.time() - t0, jobs=jobs)
    return out / "report.md"


def _cost(cfg: RunConfig) -> float:
    """A rough relative cost, to start the slowest runs first."""
    per_step = {"noisy": 20.0, "none": 0.5}.get(cfg.norm, 1.0)
    if cfg.model == "vgg":
        per_step *= 3.0
    return cfg.steps * per_step


# ----------------------------------------------------------------------------- measurements


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def early_train_acc(run: Run, until: int) -> float:
    """Mean per-minibatch training accuracy over the logged steps 0..until."""
    return _mean(r["acc"] for r in run.of("train") if r["step"] <= until)


def final_train(run: Run, key: str = "acc", frac: float = 0.1) -> float:
    """Mean of ``key`` over the last ``frac`` of the logged training records."""
    recs = run.of("train")
    k = max(1, int(len(recs) * frac))
    return _mean(r[key] for r in recs[-k:])


def final_test_acc(run: Run) -> float:
    recs = run.of("test")
    return recs[-1]["acc"] if recs else math.nan


def ics_mean(run: Run, key: str) -> float:
    return _mean(r[key] for r in run.of("ics"))


def landscape_median(run: Run, key: str, direction: str = "gradient",
                     until: int | None = None) -> float:
    recs = [r for r in run.of("landscape", direction=direction)
            if until is None or r["step"] <= until]
    if key == "loss_band":
        return _median(r["loss_max"] - r["loss_min"] for r in recs)
    return _median(r[key] for r in recs)


def moment_shift(run: Run) -> float:
    """Median over sampled units and step pairs of |change of mean| + |change of std| between
    successive steps (Figs. 7, 8, 14)."""
    out = []
    for layer in run.config.act_layers:
        recs = run.of("act", layer=layer)
        by_step = {r["step"]: r for r in recs}
        for ch in moment_changes(recs):
            a, b = by_step[ch["step"]], by_step[ch["step"] + 1]
            for u, dm in enumerate(ch["d_mean"]):
                out.append(dm + abs(math.sqrt(b["var"][u]) - math.sqrt(a["var"][u])))
    return _median(out)


# ----------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """One claim of the paper and how it is checked here."""

    text: str  # the claim
    figure: str  # where the paper shows it
    paper: str  # the paper's number(s)
    criterion: str  # when it counts as held here
    check: Callable  # (runs, suite) -> (measured text, True | False | None)


def _g(runs, model, norm, lr):
    return runs.get(run_name(model, norm, lr))


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _ok(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _c_train_faster(runs, s):
    std, bn = _g(runs, "vgg", "none", 0.1), _g(runs, "vgg", "batchnorm", 0.1)
    if not (std and bn):
        return "runs missing", None
    a, b = early_train_acc(std, s.early_step), early_train_acc(bn, s.early_step)
    held = b > a if _ok(a, b) else None
    return (f"mean train acc over steps 0-{s.early_step}: standard {_pct(a)}, BN {_pct(b)}; "
            f"at the end: {_pct(final_train(std))} vs {_pct(final_train(bn))}"), held


def _c_test(runs, s):
    std, bn = _g(runs, "vgg", "none", 0.1), _g(runs, "vgg", "batchnorm", 0.1)
    if not (std and bn):
        return "runs missing", None
    a, b = final_test_acc(std), final_test_acc(bn)
    return f"final test acc: standard {_pct(a)}, BN {_pct(b)}", (b > a if _ok(a, b) else None)


def _c_high_lr(runs, s):
    lr = s.vgg_high_lr
    std, bn = _g(runs, "vgg", "none", lr), _g(runs, "vgg", "batchnorm", lr)
    if not (std and bn):
        return "runs missing", None
    a, b = final_test_acc(std), final_test_acc(bn)
    held = (a < 0.2 and b > a + 0.3) if _ok(a, b) else None
    return (f"lr {lr:g}: final test acc standard {_pct(a)}, BN {_pct(b)} (train "
            f"{_pct(final_train(std))} vs {_pct(final_train(bn))})"), held


def _c_noisy_trains(runs, s):
    std, bn, noisy = (_g(runs, "vgg", n, 0.1) for n in ("none", "batchnorm", "noisy"))
    if not (std and bn and noisy):
        return "runs missing", None
    a, b, c = (early_train_acc(r, s.early_step) for r in (std, bn, noisy))
    held = (c > a and b - c <= 0.10) if _ok(a, b, c) else None
    return (f"mean train acc over steps 0-{s.early_step}: standard {_pct(a)}, BN {_pct(b)}, "
            f"noisy BN {_pct(c)}"), held


def _c_noisy_unstable(runs, s):
    std, bn, noisy = (_g(runs, "vgg", n, 0.1) for n in ("none", "batchnorm", "noisy"))
    if not (std and bn and noisy):
        return "runs missing", None
    a, b, c = (moment_shift(r) for r in (std, bn, noisy))
    held = c > a if _ok(a, c) else None
    return (f"median step-to-step |d mean| + |d std|: standard {_fmt(a)}, BN {_fmt(b)}, "
            f"noisy BN {_fmt(c)}"), held


def _c_ics_vgg(runs, s):
    std, bn = _g(runs, "vgg", "none", 0.1), _g(runs, "vgg", "batchnorm", 0.1)
    if not (std and bn and std.of("ics")):
        return "runs missing", None
    ca, cb = ics_mean(std, "cosine"), ics_mean(bn, "cosine")
    la, lb = ics_mean(std, "l2"), ics_mean(bn, "l2")
    held = cb <= ca + 0.05 if _ok(ca, cb) else None
    layers = ", ".join(f"#{i}" for i in std.config.ics_layers)
    return (f"layers {layers}, mean cos(G, G'): standard {_fmt(ca, 2)}, BN {_fmt(cb, 2)}; "
            f"mean ||G - G'||: {_fmt(la)} vs {_fmt(lb)}"), held


def _c_ics_dln(runs, s):
    lr = s.dln_low_lr
    std, bn = _g(runs, "dln", "none", lr), _g(runs, "dln", "batchnorm", lr)
    if not (std and bn):
        lr = s.dln.lr
        std, bn = _g(runs, "dln", "none", lr), _g(runs, "dln", "batchnorm", lr)
    if not (std and bn and std.of("ics")):
        return "runs missing", None
    ca, cb = ics_mean(std, "cosine"), ics_mean(bn, "cosine")
    lo = min((r["cosine"] for r in bn.of("ics")), default=math.nan)
    la, lb = ics_mean(std, "l2"), ics_mean(bn, "l2")
    held = (ca > 0.9 and cb < 0.5) if _ok(ca, cb) else None
    return (f"lr {lr:g}, mean cos: standard {_fmt(ca, 3)}, BN {_fmt(cb, 2)} (BN min "
            f"{_fmt(lo, 2)}); mean ||G - G'||: {_fmt(la)} vs {_fmt(lb)}"), held


def _landscape_pair(runs, model, lr):
    return _g(runs, model, "none", lr), _g(runs, model, "batchnorm", lr)


def _early(s, run):
    return max(s.early_step, run.config.steps // 2)


def _c_loss_band(runs, s):
    std, bn = _landscape_pair(runs, "vgg", 0.1)
    if not (std and bn and std.of("landscape")):
        return "runs missing", None
    until = _early(s, std)
    a, b = (landscape_median(r, "loss_band", until=until) for r in (std, bn))
    held = b < a if _ok(a, b) else None
    return (f"median loss-band width (max - min) over probes at steps <= {until}: standard "
            f"{_fmt(a)}, BN {_fmt(b)}"), held


def _c_predictive(runs, s):
    std, bn = _landscape_pair(runs, "vgg", 0.1)
    if not (std and bn and std.of("landscape")):
        return "runs missing", None
    until = _early(s, std)
    a, b = (landscape_median(r, "grad_diff_max", until=until) for r in (std, bn))
    held = b < a if _ok(a, b) else None
    ratio = a / b if _ok(a, b) and b > 0 else math.nan
    return (f"median upper band of ||grad L(w) - grad L(w - eta g)|| (steps <= {until}): "
            f"standard {_fmt(a)}, BN {_fmt(b)}: {_fmt(ratio, 2)}x"), held


def _c_beta(runs, s):
    std, bn = _landscape_pair(runs, "vgg", 0.1)
    if not (std and bn and std.of("landscape")):
        return "runs missing", None
    a, b = (landscape_median(r, "beta_smoothness") for r in (std, bn))
    held = b < a if _ok(a, b) else None
    return f"median effective beta-smoothness: standard {_fmt(a)}, BN {_fmt(b)}", held


def _c_random(runs, s):
    std, bn = _landscape_pair(runs, "vgg", 0.1)
    if not (std and bn and std.of("landscape", direction="random")):
        return "not probed (landscape_directions lacks 'random')", None
    a, b = (landscape_median(r, "loss_band", "random") for r in (std, bn))
    c, d = (landscape_median(r, "beta_smoothness", "random") for r in (std, bn))
    held = (b < a and d < c) if _ok(a, b, c, d) else None
    return (f"random directions: median loss-band width standard {_fmt(a)}, BN {_fmt(b)}; "
            f"median beta {_fmt(c)} vs {_fmt(d)}"), held


def _c_dln_smooth(runs, s):
    std, bn = _landscape_pair(runs, "dln", s.dln.lr)
    if not (std and bn and std.of("landscape")):
        return "runs missing", None
    until = _early(s, std)
    a, b = (landscape_median(r, "grad_diff_max", until=until) for r in (std, bn))
    c, d = (landscape_median(r, "beta_smoothness") for r in (std, bn))
    held = (b < a and d < c) if _ok(a, b, c, d) else None
    orders = math.log10(a / b) if _ok(a, b) and a > 0 and b > 0 else math.nan
    return (f"median grad-difference upper band (steps <= {until}): standard {_fmt(a)}, BN "
            f"{_fmt(b)} ({_fmt(orders, 2)} orders of magnitude); median beta {_fmt(c)} vs "
            f"{_fmt(d)}"), held


def _c_lp_vgg(runs, s):
    bn = _g(runs, "vgg", "batchnorm", 0.1)
    std = _g(runs, "vgg", "none", 0.1)
    lps = {n: _g(runs, "vgg", n, 0.1) for n in ("l1", "l2", "linf")}
    if not (bn and std and all(lps.values())):
        return "runs missing", None
    ref = final_test_acc(bn)
    acc = {n: final_test_acc(r) for n, r in lps.items()}
    early = {n: early_train_acc(r, s.early_step) for n, r in lps.items()}
    std_early = early_train_acc(std, s.early_step)
    ok = _ok(ref, std_early, *acc.values(), *early.values())
    held = (all(abs(a - ref) <= 0.05 for a in acc.values())
            and all(e > std_early for e in early.values())) if ok else None
    parts = ", ".join(f"{n} {_pct(acc[n])}" for n in lps)
    return (f"final test acc: BN {_pct(ref)}, {parts}; early train acc: standard "
            f"{_pct(std_early)}, " + ", ".join(f"{n} {_pct(early[n])}" for n in lps)), held


def _dln_final(runs, s) -> dict[str, float]:
    out = {}
    for n in ("none", "batchnorm", "l1", "l2", "linf"):
        r = _g(runs, "dln", n, s.dln.lr)
        if r is not None and r.of("train"):
            out[n] = r.of("train")[-1]["loss"]
    return out


def _c_lp_dln_beat_std(runs, s):
    f = _dln_final(runs, s)
    if len(f) < 5:
        return "runs missing", None
    held = all(f[n] < f["none"] for n in ("batchnorm", "l1", "l2", "linf")) \
        if _ok(*f.values()) else None
    steps = _g(runs, "dln", "none", s.dln.lr).config.steps
    return (f"final loss after {steps} steps: " +
            ", ".join(f"{LABELS[n].replace('Standard + ', '')} {_fmt(v)}" for n, v in f.items()),
            held)


def _c_l1_beats_bn(runs, s):
    f = _dln_final(runs, s)
    if "l1" not in f or "batchnorm" not in f:
        return "runs missing", None
    held = f["l1"] < f["batchnorm"] if _ok(f["l1"], f["batchnorm"]) else None
    return f"final loss: l1 {_fmt(f['l1'], 4)}, BN {_fmt(f['batchnorm'], 4)}", held


def _c_lp_smooth(runs, s):
    parts, held = [], True
    for model, lr in (("vgg", 0.1), ("dln", s.dln.lr)):
        std = _g(runs, model, "none", lr)
        if std is None or not std.of("landscape"):
            return "runs missing", None
        a = landscape_median(std, "beta_smoothness")
        vals = {}
        for n in ("l1", "l2", "linf"):
            r = _g(runs, model, n, lr)
            if r is None:
                return "runs missing", None
            vals[n] = landscape_median(r, "beta_smoothness")
        if not _ok(a, *vals.values()):
            held = None
        elif held is not None:
            held = held and all(v < a for v in vals.values())
        parts.append(f"{model.upper()} median beta: standard {_fmt(a)}, " +
                     ", ".join(f"{n} {_fmt(v)}" for n, v in vals.items()))
    return "; ".join(parts), held


def _c_lp_shift(runs, s):
    std = _g(runs, "vgg", "none", 0.1)
    lps = {n: _g(runs, "vgg", n, 0.1) for n in ("l1", "l2", "linf")}
    if not (std and all(lps.values())):
        return "runs missing", None
    a = moment_shift(std)
    vals = {n: moment_shift(r) for n, r in lps.items()}
    held = all(v > a for v in vals.values()) if _ok(a, *vals.values()) else None
    return (f"median step-to-step |d mean| + |d std|: standard {_fmt(a)}, " +
            ", ".join(f"{n} {_fmt(v)}" for n, v in vals.items())), held


CLAIMS: list[Claim] = [
    Claim("BatchNorm makes VGG train faster (lr 0.1)", "Fig. 1a",
          "train acc at 500 steps: 36% standard vs 68% BN; 2k: 70% vs 89%",
          "BN's mean early training accuracy > the standard network's", _c_train_faster),
    Claim("BatchNorm improves test accuracy (lr 0.1)", "Fig. 1b",
          "80.0% standard vs 82.9% BN (CIFAR-10, no augmentation)",
          "BN's final test accuracy > the standard network's", _c_test),
    Claim("At lr 0.5 the standard VGG fails to train while BatchNorm trains", "Fig. 1",
          "test acc 10% standard vs 80.2% BN",
          "standard < 20% and BN > standard + 30 points (final test accuracy)", _c_high_lr),
    Claim('"Noisy" BatchNorm (severe covariate shift) trains nearly as well as BatchNorm, '
          "and better than the standard network", "Fig. 2",
          "train acc at 500 steps: 64% noisy vs 68% BN vs 36% standard",
          "noisy > standard, and BN - noisy <= 10 points (mean early training accuracy)",
          _c_noisy_trains),
    Claim('"Noisy" BatchNorm\'s activations are less stable than even the standard '
          "network's", "Figs. 2, 7, 8",
          "step-to-step change of mean: up to ~1.0 noisy, ~0.01-0.14 standard, < 0.01 BN",
          "noisy's median step-to-step moment change > the standard network's",
          _c_noisy_unstable),
    Claim("BatchNorm does not reduce ICS (Definition 2.1) in VGG: similar or worse",
          "Fig. 3 (VGG)",
          "layer #5: cos ~0.6-0.8 standard vs ~0.5-0.7 BN; l2 ~0.2-0.9 vs ~0.7-3.7",
          "BN's mean cos(G, G') <= standard's + 0.05", _c_ics_vgg),
    Claim("In the DLN the standard network has almost no ICS while BN's G and G' are "
          "nearly uncorrelated", "Fig. 3 (DLN)",
          "lr 1e-7: cos ~1 standard; BN cos swings over [-1, 1], l2 ~1e3-1e4",
          "standard mean cos > 0.9 and BN mean cos < 0.5", _c_ics_dln),
    Claim("BatchNorm makes the loss change less along the gradient (Lipschitzness)",
          "Fig. 4a", "loss band at step 1k: [2.6, 8.1] standard vs [1.85, 2.74] BN",
          "BN's median band width < standard's (first half of training)", _c_loss_band),
    Claim("BatchNorm makes gradients more predictive", "Fig. 4b",
          '"close to two orders of magnitude" (text); ~5-10x in the figure\'s upper band',
          "BN's median upper band < standard's (first half of training)", _c_predictive),
    Claim('BatchNorm lowers the "effective" beta-smoothness', "Fig. 4c",
          "~19-23 standard (spikes to 45) vs ~16-20 BN",
          "BN's median < standard's", _c_beta),
    Claim("The landscape behaves similarly along random directions", "Sec. 3.2",
          "stated in the text, no figure",
          "BN's median loss band and beta < standard's along random directions", _c_random),
    Claim("BatchNorm smooths the deep linear network's landscape too", "Fig. 9",
          ">= 3 orders of magnitude in gradient predictiveness",
          "BN's median gradient difference and beta < standard's", _c_dln_smooth),
    Claim("l_p normalizations train VGG comparably to BatchNorm", "Fig. 13",
          "all l_p variants comparable to BN",
          "each l_p within 5 points of BN's final test accuracy and faster than standard early",
          _c_lp_vgg),
    Claim("l_p normalizations beat the standard DLN", "Fig. 13",
          "final loss at lr 1e-6: standard 1.66e3, BN 4.8e2, l1 1.0e2, l2 4.8e2, linf 9.9e2",
          "every normalized DLN's final loss < the standard one's", _c_lp_dln_beat_std),
    Claim("l1 normalization beats BatchNorm on the DLN", "Fig. 13 / Sec. 3.3",
          "l1 1.0e2 vs BN 4.8e2", "l1's final loss < BN's", _c_l1_beats_bn),
    Claim("l_p normalizations smooth the landscape like BatchNorm", "Figs. 11, 12",
          "qualitative (figures)", "each l_p's median beta < the standard network's, "
          "VGG and DLN", _c_lp_smooth),
    Claim("l_p normalizations shift activation distributions more than the standard network",
          "Fig. 14 / Sec. 3.3", "qualitative (figure)",
          "each l_p's median step-to-step moment change > standard's", _c_lp_shift),
]


def evaluate_claims(runs: dict[str, Run], suite: SuiteConfig) -> list[dict]:
    rows = []
    for i, c in enumerate(CLAIMS, start=1):
        try:
            measured, held = c.check(runs, suite)
        except (KeyError, IndexError, ZeroDivisionError, ValueError) as e:
            measured, held = f"could not measure: {type(e).__name__}: {e}", None
        rows.append({"id": i, "claim": c.text, "figure": c.figure, "paper": c.paper,
                     "criterion": c.criterion, "measured": measured,
                     "held": {True: "held", False: "not held", None: "not measured"}[held]})
    return rows


# ----------------------------------------------------------------------------- report.md

FIGURE_CAPTIONS = {
    "fig1": "Fig. 1: VGG with and without BatchNorm at lr 0.1 (solid) and the high lr (dashed): "
            "(a) per-minibatch training accuracy, (b) test accuracy, (c) activation "
            "distribution (quantile bands) of a late layer.",
    "fig2": "Fig. 2: standard, BatchNorm and noisy BatchNorm: training accuracy and activation "
            "distributions at three depths.",
    "fig3": "Fig. 3: internal covariate shift (Definition 2.1): cos(G, G') and ||G - G'||.",
    "fig4": "Fig. 4: VGG landscape along the gradient (and random directions): loss band, "
            "gradient predictiveness band, effective beta-smoothness.",
    "fig7": "Fig. 7: mean and variance of a random activation per layer over training.",
    "fig8": "Fig. 8: change of the first two moments between successive steps.",
    "fig9": "Fig. 9: deep linear network landscape, standard vs BatchNorm.",
    "fig10": "Fig. 10: gradient difference and loss against the step length eta, early / "
             "middle / late in training.",
    "fig11": "Fig. 11: VGG landscape with l_p normalizations.",
    "fig12": "Fig. 12: DLN landscape with l_p normalizations.",
    "fig13": "Fig. 13: training with l_p normalizations (VGG accuracy, DLN loss).",
    "fig14": "Fig. 14: activation distributions with l_p normalizations.",
}


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def write_report(suite_dir: str | os.PathLike, train_seconds: float | None = None,
                 jobs: int | None = None, figures: bool = True) -> Path:
    """Figures (unless ``figures=False``: those already there are linked) and report.md for
    the suite in ``suite_dir``, from its saved files only."""
    d = Path(suite_dir)
    meta = json.loads((d / "suite.json").read_text())
    suite = suite_from_dict(meta["suite"])
    runs = load_suite(d)
    figures = (make_figures(d, runs) if figures else
               {p.stem: p for p in sorted(d.glob("fig*.png"), key=lambda p: int(p.stem[3:]))})
    rows = evaluate_claims(runs, suite)
    (d / "claims.json").write_text(json.dumps(rows, indent=2) + "\n")
    counts = {k: sum(r["held"] == k for r in rows) for k in ("held", "not held", "not measured")}
    ver = versions(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    lines = [
        "# Reproduction: How Does Batch Normalization Help Optimization?",
        "",
        f"Santurkar, Tsipras, Ilyas, Madry (NeurIPS 2018). Mode: **{meta['mode']}**. "
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} on {ver['device']} "
        f"({platform.machine()}, torch {ver['torch']}, bnkernels {ver['bnkernels']}, "
        f"git {(ver['git_commit'] or 'unknown')[:10]}{' (dirty)' if ver['git_dirty'] else ''}).",
        "",
    ]
    if train_seconds is not None:
        lines += [f"Training and measurements took {train_seconds:.0f} s of wall time in this "
                  f"call ({jobs} parallel job(s)); finished runs are reused on a rerun. The "
                  "runs table gives each run's own training seconds.", ""]
    if meta["mode"] != "full":
        v, dl = suite.vgg, suite.dln
        lines += [
            f"**{meta['mode'].capitalize()} mode** is a scaled-down check, not the paper's setup: "
            f"{v.arch.upper()} at width x{v.width:g} on `{v.dataset}` for {v.steps} steps "
            f"(noisy BN: {suite.noisy_steps or v.steps}) instead of VGG-16 on CIFAR-10 for "
            f"15,000; the deep linear network at full size ({dl.depth} layers of "
            f"{dl.dim}x{dl.dim}) but {dl.steps} steps instead of 10,000. Numbers are therefore "
            "compared by direction (the criterion column), not by value, and the verdicts "
            "that rest on a handful of ICS or landscape measurements of one seed (claims on "
            "ICS, gradient predictiveness, beta-smoothness) can flip with the measurement "
            "schedule or the seed. `bnkernels reproduce` (no --quick) runs the paper's step "
            "counts.", ""]
    lines += [
        f"## Claims ({counts['held']} held, {counts['not held']} not held, "
        f"{counts['not measured']} not measured)",
        "",
        "| # | claim | paper (figure: number) | measured here | criterion | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = {"held": "held", "not held": "**not held**", "not measured": "not measured"}
        lines.append(f"| {r['id']} | {_md_escape(r['claim'])} | {_md_escape(r['figure'])}: "
                     f"{_md_escape(r['paper'])} | {_md_escape(r['measured'])} | "
                     f"{_md_escape(r['criterion'])} | {mark[r['held']]} |")
    lines += ["", "## Runs", "",
              "| run | steps | final train loss | final train acc | test acc | seconds |",
              "|---|---|---|---|---|---|"]
    for name, run in sorted(runs.items()):
        tr = run.of("train")
        last = tr[-1] if tr else {}
        done = json.loads((run.dir / "done.json").read_text()) if run.finished else {}
        secs = done.get("seconds")
        steps = f"{done.get('steps', last.get('step', -1) + 1)}" + ("" if run.finished
                                                                    else " (unfinished)")
        lines.append(f"| {name} | {steps} | {_fmt(last.get('loss', math.nan), 4)} | "
                     f"{_pct(last['acc']) if 'acc' in last else '-'} | "
                     f"{_pct(final_test_acc(run)) if run.of('test') else '-'} | "
                     f"{'-' if secs is None else f'{secs:.0f}'} |")
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        lines += [f"**{FIGURE_CAPTIONS.get(name, name)}**", "", f"![{name}]({path.name})", ""]
    lines += [
        "## Notes", "",
        "- Every number above is computed from the runs' `metrics.jsonl` by "
        "`bnkernels.experiments.report`; the criteria are fixed in code, not tuned to the "
        "outcome. `claims.json` holds the same table.",
        "- ICS follows Definition 2.1 exactly (same batch; G' after an SGD step of layers "
        "1..i-1 only, a layer being a weight layer with its normalization's parameters).",
        "- Landscape probes move all parameters to w - eta g for the configured eta and restore "
        "them; beta = max over eta of ||grad L(w) - grad L(w - eta g)|| / ||eta g||.",
        "- The paper's numbers marked in EXPERIMENTS.md as read off figures are approximate.",
        "- Noisy BatchNorm's test accuracy is measured in eval mode (running statistics, no "
        "noise); its running statistics were gathered under the noise, which can make it far "
        "lower than its training accuracy. The paper reports only its training accuracy.",
        "",
    ]
    path = d / "report.md"
    path.write_text("\n".join(lines))
    return path


def claims_table_text(suite_dir: str | os.PathLike) -> str:
    """The claims table of a written report, as plain text for the terminal."""
    rows = json.loads((Path(suite_dir) / "claims.json").read_text())
    return "\n".join(f"{r['id']:>2}. [{r['held']}] {r['claim']}\n      {r['measured']}"
                     for r in rows)
