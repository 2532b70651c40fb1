"""The paper's figures, drawn only from saved runs (config.json + metrics.jsonl).

A suite folder (written by ``bnkernels reproduce``) holds ``suite.json`` naming its runs
``<model>-<norm>-lr<lr>-seed<seed>`` (e.g. ``vgg-batchnorm-lr0.1-seed0``,
``dln-l1-lr1e-06-seed2``); the runs of one configuration over its seeds form a group named
without the seed. Each ``fig*`` function draws one figure of the paper from whichever of its
runs exist and returns the PNG's path, or None when none of the runs it needs is there. Curves
of a group show the median over seeds with the range (min to max) shaded; distributions and
per-step snapshots show the group's first seed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .activations import QUANTILES, moment_changes  # noqa: E402
from .config import RunConfig  # noqa: E402
from .train import read_metrics  # noqa: E402

LABELS = {"none": "Standard", "batchnorm": "Standard + BatchNorm", "noisy": 'Standard + "Noisy" BN',
          "l1": "l1 norm", "l2": "l2 norm", "linf": "l_inf norm", "torch": "torch BatchNorm"}
COLORS = {"none": "tab:blue", "batchnorm": "tab:red", "noisy": "tab:green", "l1": "tab:purple",
          "l2": "tab:orange", "linf": "tab:brown", "torch": "tab:gray"}
LP_NORMS = ("none", "batchnorm", "l1", "l2", "linf")


def base_name(model: str, norm: str, lr: float) -> str:
    """The name of a configuration (its runs over seeds): ``<model>-<norm>-lr<lr>``."""
    return f"{model}-{norm}-lr{lr:g}"


def run_name(model: str, norm: str, lr: float, seed: int | None = None) -> str:
    """A run's name in a suite: the configuration's name and ``-seed<seed>``."""
    return base_name(model, norm, lr) + ("" if seed is None else f"-seed{seed}")


@dataclass
class Run:
    """One saved run: its folder, config and metrics records."""

    name: str
    dir: Path
    config: RunConfig
    records: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, name: str | None = None) -> Run:
        d = Path(run_dir)
        cfg = RunConfig.from_dict(json.loads((d / "config.json").read_text()))
        return cls(name or d.name, d, cfg, read_metrics(d))

    def of(self, kind: str, **match) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind
                and all(r.get(k) == v for k, v in match.items())]

    def series(self, kind: str, key: str, **match) -> tuple[list[int], list[float]]:
        rs = self.of(kind, **match)
        return [r["step"] for r in rs], [r[key] for r in rs]

    @property
    def finished(self) -> bool:
        return (self.dir / "done.json").is_file()


def load_suite(suite_dir: str | os.PathLike) -> dict[str, Run]:
    """The runs of a suite folder that have metrics, by name."""
    d = Path(suite_dir)
    meta = json.loads((d / "suite.json").read_text())
    runs = {}
    for name, entry in meta["runs"].items():
        rd = d / entry["dir"]
        if (rd / "config.json").is_file():
            runs[name] = Run.load(rd, name)
    return runs


def seed_groups(runs: dict[str, Run]) -> dict[str, list[Run]]:
    """Runs grouped by configuration (model, norm, lr), each group ordered by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs.values():
        c = run.config
        groups.setdefault(base_name(c.model, c.norm, c.lr), []).append(run)
    return {k: sorted(v, key=lambda r: r.config.seed) for k, v in sorted(groups.items())}


def _groups(runs) -> dict[str, list[Run]]:
    """Accept runs by name (load_suite) or already grouped."""
    if runs and isinstance(next(iter(runs.values())), list):
        return runs
    return seed_groups(runs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def base_lr(groups: dict[str, list[Run]], model: str, default: float) -> float:
    """The learning rate most of ``model``'s configurations train at (the suite's base lr:
    the paper's 0.1 for VGG and 1e-6 for the DLN, 0.05 for the quick VGG); ``default`` when
    there is none."""
    count: dict[float, int] = {}
    for group in groups.values():
        c = group[0].config
        if c.model == model:
            count[c.lr] = count.get(c.lr, 0) + 1
    return max(count, key=lambda lr: (count[lr], -lr)) if count else default


def _vgg_lr(groups) -> float:
    return base_lr(groups, "vgg", 0.1)


def _dln_lr(groups) -> float:
    return base_lr(groups, "dln", 1e-6)


def _pick(groups: dict[str, list[Run]], model: str, lr: float,
          norms) -> list[tuple[str, list[Run]]]:
    return [(n, groups[base_name(model, n, lr)]) for n in norms
            if base_name(model, n, lr) in groups]


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _over_seeds(series: list[tuple[list, list]]):
    """(steps, median, min, max) over the seeds' series at the steps where any seed has a
    finite value."""
    by_step: dict = {}
    for xs, ys in series:
        for x, y in zip(xs, ys):
            if y is not None and math.isfinite(y):
                by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return (steps, [statistics.median(by_step[x]) for x in steps],
            [min(by_step[x]) for x in steps], [max(by_step[x]) for x in steps])


def _curve(ax, group: list[Run], kind: str, key: str, color, label, band: bool = True,
           match: dict | None = None, transform=None, **kw):
    """The median over the group's seeds of ``key`` (``transform``-ed) in its ``kind``
    records, the range shaded (for more than one seed)."""
    series = [r.series(kind, key, **(match or {})) for r in group]
    if transform is not None:
        series = [(xs, [transform(y) for y in ys]) for xs, ys in series]
    steps, med, lo, hi = _over_seeds(series)
    ax.plot(steps, med, color=color, label=label, **kw)
    if band and len(group) > 1 and steps:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)


def _train_curve(ax, group: list[Run], norm: str, key: str = "acc", kind: str = "train", **kw):
    _curve(ax, group, kind, key, COLORS.get(norm), kw.pop("label", LABELS.get(norm, norm)),
           **kw)


def _distribution(ax, run: Run, layer: int, title: str):
    """Quantile bands over steps of the first sampled unit of ``layer`` (Figs. 1c, 2, 14)."""
    recs = [r for r in run.of("act", layer=layer)
            if r["step"] % max(run.config.act_every, 1) == 0]
    if not recs:
        ax.set_visible(False)
        return
    steps = [r["step"] for r in recs]
    q = [r["quantiles"][0] for r in recs]
    n = len(QUANTILES)
    for k in range(n // 2):
        ax.fill_between(steps, [v[k] for v in q], [v[n - 1 - k] for v in q],
                        color="tab:blue", alpha=0.15 + 0.15 * k, lw=0)
    ax.plot(steps, [v[n // 2] for v in q], color="navy", lw=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")


# ----------------------------------------------------------------------------- figures


def fig1(runs, out: Path) -> Path | None:
    """Fig. 1: VGG with and without BatchNorm: (a) training accuracy at the base lr (the
    paper's 0.1) and the high lr (0.5), (b) test accuracy, (c) activation distributions of
    one layer."""
    groups = _groups(runs)
    lr0 = _vgg_lr(groups)
    lrs = sorted({g[0].config.lr for g in groups.values() if g[0].config.model == "vgg"})
    sel = [(n, lr, groups[base_name("vgg", n, lr)]) for lr in [lr0] + [x for x in lrs if x != lr0]
           for n in ("none", "batchnorm") if base_name("vgg", n, lr) in groups]
    if not sel:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for n, lr, group in sel:
        style = "-" if lr == lr0 else "--"
        _train_curve(axes[0], group, n, ls=style, label=f"{LABELS[n]}, lr {lr:g}")
        _train_curve(axes[1], group, n, kind="test", ls=style, marker=".",
                     label=f"{LABELS[n]}, lr {lr:g}")
    axes[0].set(title="(a) training accuracy (per minibatch)", xlabel="step", ylabel="accuracy")
    axes[1].set(title="(b) test accuracy", xlabel="step", ylabel="accuracy")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    for ax, n in zip(axes[2:], ("none", "batchnorm")):
        group = groups.get(base_name("vgg", n, lr0))
        if not group:
            ax.set_visible(False)
            continue
        run = group[0]
        layer = run.config.act_layers[-1] if run.config.act_layers else 1
        _distribution(ax, run, layer, f"(c) {LABELS[n]}: layer #{layer} activation")
    return _save(fig, out / "fig1.png")


def fig2(runs, out: Path) -> Path | None:
    """Fig. 2: standard, BatchNorm and noisy BatchNorm: training accuracy and activation
    distributions of layers at the same depth."""
    groups = _groups(runs)
    sel = _pick(groups, "vgg", _vgg_lr(groups), ("none", "batchnorm", "noisy"))
    if not sel:
        return None
    layers = sel[0][1][0].config.act_layers
    fig, axes = plt.subplots(len(layers), 1 + len(sel), figsize=(4 * (1 + len(sel)),
                                                                  2.8 * len(layers)),
                             squeeze=False)
    for n, group in sel:
        _train_curve(axes[0][0], group, n)
    axes[0][0].set(title="training accuracy", xlabel="step", ylabel="accuracy")
    axes[0][0].legend(fontsize=7)
    for r in range(1, len(layers)):
        axes[r][0].set_visible(False)
    for c, (n, group) in enumerate(sel, start=1):
        for r, layer in enumerate(layers):
            _distribution(axes[r][c], group[0], layer, f"{LABELS[n]}: layer #{layer}")
    return _save(fig, out / "fig2.png")


def _loss_at(run: Run, step: int) -> float:
    """The training loss logged last at or before ``step``."""
    before = [r for r in run.of("train") if r["step"] <= step] or run.of("train")[:1]
    return before[-1]["loss"] if before else math.nan


def _ics_axes(axes, sel, layers, title):
    for k, layer in enumerate(layers):
        for n, group in sel:
            _curve(axes[0][k], group, "ics", "cosine", COLORS[n], LABELS[n],
                   match={"layer": layer})
            _curve(axes[1][k], group, "ics", "l2", COLORS[n], LABELS[n],
                   match={"layer": layer})
            pts = [(_loss_at(run, r["step"]), r["cosine"]) for run in group
                   for r in run.of("ics", layer=layer)]
            pts = [(a, b) for a, b in pts if math.isfinite(a) and a > 0 and math.isfinite(b)]
            if pts:
                axes[2][k].scatter(*zip(*pts), s=9, color=COLORS[n], label=LABELS[n],
                                   alpha=0.7)
        axes[2][k].set(title=f"{title}: layer #{layer}, cos(G, G') at matched loss",
                       xlabel="training loss (training goes left)", xscale="log")
        axes[2][k].invert_xaxis()
        axes[0][k].set(title=f"{title}: layer #{layer}, cos(G, G')", xlabel="step")
        axes[1][k].set(title=f"{title}: layer #{layer}, ||G - G'||", xlabel="step", yscale="log")
        axes[0][k].legend(fontsize=7)


def fig3(runs, out: Path) -> Path | None:
    """Fig. 3: ICS (Definition 2.1) with and without BatchNorm: VGG (base lr) and DLN (the
    lowest lr with ICS records: the paper's 1e-7)."""
    groups = _groups(runs)
    vgg_lr = _vgg_lr(groups)
    vgg = _pick(groups, "vgg", vgg_lr, ("none", "batchnorm"))
    ics_lrs = sorted({g[0].config.lr for g in groups.values()
                      if g[0].config.model == "dln" and any(r.of("ics") for r in g)})
    dln_lr = ics_lrs[0] if ics_lrs else _dln_lr(groups)
    dln = _pick(groups, "dln", dln_lr, ("none", "batchnorm"))
    panels = [(sel, sel[0][1][0].config.ics_layers, f"{m} lr {lr:g}")
              for sel, m, lr in ((vgg, "VGG", vgg_lr), (dln, "DLN", dln_lr)) if sel]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    ncol = sum(len(p[1]) for p in panels)
    fig, axes = plt.subplots(3, ncol, figsize=(4.2 * ncol, 9.8), squeeze=False)
    c = 0
    for sel, layers, title in panels:
        sub = [[axes[row][c + k] for k in range(len(layers))] for row in range(3)]
        _ics_axes(sub, sel, layers, title)
        c += len(layers)
    return _save(fig, out / "fig3.png")


def _landscape_axes(axes, sel, direction="gradient"):
    for n, group in sel:
        match = {"direction": direction}
        if not any(r.of("landscape", **match) for r in group):
            continue
        kw = dict(color=COLORS[n], alpha=0.3, lw=0)
        edges = {}
        for key in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max"):
            steps, med, _, _ = _over_seeds([r.series("landscape", key, **match) for r in group])
            edges[key] = (steps, med)
        for ax, lo_key, hi_key in ((axes[0], "loss_min", "loss_max"),
                                   (axes[1], "grad_diff_min", "grad_diff_max")):
            (s_lo, lo), (s_hi, hi) = edges[lo_key], edges[hi_key]
            if s_lo != s_hi:
                continue
            lo = [max(v, 1e-30) for v in lo]
            ax.fill_between(s_lo, lo, hi, label=LABELS[n], **kw)
            ax.plot(s_lo, lo, color=COLORS[n], lw=0.7)  # the edges show a band too thin to fill
            ax.plot(s_lo, hi, color=COLORS[n], lw=0.7)
        _curve(axes[2], group, "landscape", "beta_smoothness", COLORS[n], LABELS[n],
               match=match)
    axes[0].set(title="(a) loss landscape", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="(b) gradient predictiveness", xlabel="step",
                ylabel="||grad L(w) - grad L(w - eta g)||", yscale="log")
    axes[2].set(title='(c) "effective" beta-smoothness', xlabel="step", yscale="log")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)


def _matched_axes(axes, sel, direction="gradient"):
    """The control beside the per-step panels: every probe's loss band, gradient-difference
    upper band and effective beta against the loss at the probed weights (all seeds), so
    that networks are compared where their training losses agree."""
    for n, group in sel:
        recs = [r for run in group for r in run.of("landscape", direction=direction)]
        if not recs:
            continue
        x = [r["loss"] for r in recs]
        for ax, key in zip(axes, ("loss_band", "grad_diff_max", "beta_smoothness")):
            y = [(r["loss_max"] - r["loss_min"]) if key == "loss_band" else r[key]
                 for r in recs]
            xs, ys = _finite(x, y)
            keep = [(a, b) for a, b in zip(xs, ys) if a > 0 and b > 0]
            if keep:
                ax.scatter(*zip(*keep), s=9, color=COLORS[n], label=LABELS[n], alpha=0.7)
    titles = ("(a') loss band (max - min)", "(b') gradient-difference upper band",
              "(c') effective beta")
    for ax, t in zip(axes, titles):
        ax.set(title=f"{t} at matched loss", xlabel="training loss at w (training goes left)",
               xscale="log", yscale="log")
        ax.invert_xaxis()
        if ax.collections:
            ax.legend(fontsize=7)


def _landscape_fig(sel, path: Path, suptitle: str, directions=("gradient",)) -> Path:
    fig, axes = plt.subplots(2 * len(directions), 3, figsize=(14, 7.4 * len(directions)),
                             squeeze=False)
    for k, d in enumerate(directions):
        _landscape_axes(axes[2 * k], sel, d)
        _matched_axes(axes[2 * k + 1], sel, d)
        if len(directions) > 1:
            axes[2 * k][0].set_ylabel(f"{d} direction: loss")
    fig.suptitle(suptitle + ": per step (the paper's protocol) and against the training loss "
                 "(the matched-loss control)", fontsize=10)
    return _save(fig, path)


def fig4(runs, out: Path) -> Path | None:
    """Fig. 4: VGG landscape along the gradient (and along random directions if probed)."""
    groups = _groups(runs)
    lr = _vgg_lr(groups)
    sel = _pick(groups, "vgg", lr, ("none", "batchnorm"))
    if not sel:
        return None
    dirs = tuple(d for d in ("gradient", "random")
                 if any(r.of("landscape", direction=d) for _, g in sel for r in g))
    return _landscape_fig(sel, out / "fig4.png", f"VGG, lr {lr:g}", dirs or ("gradient",))


def _activation_fig(runs, path: Path, curves, titles, yscales, **style) -> Path | None:
    """Two rows of panels, a column per selected layer, a curve per network (standard,
    BatchNorm, noisy BatchNorm; the VGG runs' first seed): ``curves(run, layer)`` gives the
    steps and the two rows' values."""
    groups = _groups(runs)
    sel = _pick(groups, "vgg", _vgg_lr(groups), ("none", "batchnorm", "noisy"))
    if not sel:
        return None
    layers = sel[0][1][0].config.act_layers
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6), squeeze=False)
    for k, layer in enumerate(layers):
        for n, group in sel:
            steps, *rows = curves(group[0], layer)
            for row, values in enumerate(rows):
                axes[row][k].plot(steps, values, color=COLORS[n], label=LABELS[n], **style)
        for row in range(2):
            axes[row][k].set(title=f"layer #{layer}: {titles[row]}", xlabel="step",
                             yscale=yscales[row])
        axes[0][k].legend(fontsize=7)
    return _save(fig, path)


def fig7(runs, out: Path) -> Path | None:
    """Fig. 7: mean and variance of random activations of select layers over training, for
    the standard, BatchNorm and noisy BatchNorm networks (first seed)."""

    def curves(run, layer):
        recs = [r for r in run.of("act", layer=layer)
                if r["step"] % max(run.config.act_every, 1) == 0]
        return ([r["step"] for r in recs], [r["mean"][0] for r in recs],
                [r["var"][0] for r in recs])

    return _activation_fig(runs, out / "fig7.png", curves, ("mean", "variance"),
                           ("linear", "log"))


def fig8(runs, out: Path) -> Path | None:
    """Fig. 8: change of the first two moments of activations between successive steps
    (first seed)."""

    def curves(run, layer):
        ch = moment_changes(run.of("act", layer=layer))
        return ([c["step"] for c in ch], [max(c["d_mean"][0], 1e-12) for c in ch],
                [max(c["d_var"][0], 1e-12) for c in ch])

    return _activation_fig(runs, out / "fig8.png", curves,
                           ("|change of mean|", "|change of variance|"), ("log", "log"),
                           marker=".", lw=0.8)


def fig9(runs, out: Path) -> Path | None:
    """Fig. 9: DLN landscape with and without BatchNorm (base lr, the paper's 1e-6)."""
    groups = _groups(runs)
    lr = _dln_lr(groups)
    sel = _pick(groups, "dln", lr, ("none", "batchnorm"))
    return (_landscape_fig(sel, out / "fig9.png", f"Deep linear network, lr {lr:g}")
            if sel else None)


def fig10(runs, out: Path) -> Path | None:
    """Fig. 10: gradient predictiveness and loss against the distance moved along the
    gradient, early / middle / late in training (VGG, base lr, first seed)."""
    groups = _groups(runs)
    sel = [(n, g[0]) for n, g in _pick(groups, "vgg", _vgg_lr(groups), ("none", "batchnorm"))]
    if not sel:
        return None
    probes = sel[0][1].of("landscape", direction="gradient")
    if not probes:
        return None
    steps = sorted({r["step"] for r in probes})
    picks = [steps[0], steps[len(steps) // 2], steps[-1]]
    fig, axes = plt.subplots(2, len(picks), figsize=(4.2 * len(picks), 6), squeeze=False)
    for k, s in enumerate(picks):
        for n, run in sel:
            rec = next((r for r in run.of("landscape", direction="gradient", step=s)), None)
            if rec is None:
                continue
            axes[0][k].plot(rec["step_sizes"], rec["grad_diffs"], marker="o", color=COLORS[n],
                            label=LABELS[n])
            axes[1][k].plot(rec["step_sizes"], rec["losses"], marker="o", color=COLORS[n],
                            label=LABELS[n])
        axes[0][k].set(title=f"step {s}: ||grad L(w) - grad L(w - eta g)||", xlabel="eta",
                       yscale="log")
        axes[1][k].set(title=f"step {s}: loss at w - eta g", xlabel="eta", yscale="log")
        axes[0][k].legend(fontsize=7)
    return _save(fig, out / "fig10.png")


def fig11(runs, out: Path) -> Path | None:
    """Fig. 11: VGG landscape with l_p normalizations, beside BatchNorm and standard."""
    groups = _groups(runs)
    sel = _pick(groups, "vgg", _vgg_lr(groups), LP_NORMS)
    return _landscape_fig(sel, out / "fig11.png", "VGG, l_p normalization") if sel else None


def fig12(runs, out: Path) -> Path | None:
    """Fig. 12: DLN landscape with l_p normalizations, beside BatchNorm and standard."""
    groups = _groups(runs)
    sel = _pick(groups, "dln", _dln_lr(groups), LP_NORMS)
    return _landscape_fig(sel, out / "fig12.png", "DLN, l_p normalization") if sel else None


def fig13(runs, out: Path) -> Path | None:
    """Fig. 13: training with l_p normalizations: VGG training and test accuracy, DLN loss."""
    groups = _groups(runs)
    vgg = _pick(groups, "vgg", _vgg_lr(groups), LP_NORMS)
    dln_lr = _dln_lr(groups)
    dln = _pick(groups, "dln", dln_lr, LP_NORMS)
    if not vgg and not dln:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for n, group in vgg:
        _train_curve(axes[0], group, n)
        _train_curve(axes[1], group, n, kind="test", marker=".")
    for n, group in dln:
        _train_curve(axes[2], group, n, key="loss")
    axes[0].set(title="VGG: training accuracy", xlabel="step")
    axes[1].set(title="VGG: test accuracy", xlabel="step")
    axes[2].set(title=f"DLN: training loss (lr {dln_lr:g})", xlabel="step", yscale="log")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out / "fig13.png")


def fig14(runs, out: Path) -> Path | None:
    """Fig. 14: activation distributions with l_p normalizations (VGG, first seed)."""
    groups = _groups(runs)
    sel = _pick(groups, "vgg", _vgg_lr(groups), LP_NORMS)
    if not sel:
        return None
    first = sel[0][1][0]
    layer = first.config.act_layers[-1] if first.config.act_layers else 1
    fig, axes = plt.subplots(1, len(sel), figsize=(3.6 * len(sel), 3.4), squeeze=False)
    for ax, (n, group) in zip(axes[0], sel):
        _distribution(ax, group[0], layer, f"{LABELS[n]}: layer #{layer}")
    return _save(fig, out / "fig14.png")


def curvature(runs, out: Path) -> Path | None:
    """Not in the paper: the top Hessian eigenvalue along training (and the trace, when
    measured), VGG and the DLN at their base lr, for every normalization measured."""
    groups = _groups(runs)
    panels = [(f"{name}, lr {lr:g}", [(n, g) for n, g in _pick(groups, model, lr, LP_NORMS)
                                      if any(r.of("hessian") for r in g)])
              for name, model, lr in (("VGG", "vgg", _vgg_lr(groups)),
                                      ("DLN", "dln", _dln_lr(groups)))]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    traced = any("trace" in r for _, sel in panels for _, g in sel for x in g
                 for r in x.of("hessian"))
    rows = 2 if traced else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(6 * len(panels), 3.8 * rows),
                             squeeze=False)
    for k, (title, sel) in enumerate(panels):
        for n, group in sel:
            _curve(axes[0][k], group, "hessian", "top_eigenvalue", COLORS[n], LABELS[n],
                   marker=".", transform=abs)
            neg = [(r["step"], -r["top_eigenvalue"]) for run in group
                   for r in run.of("hessian") if r["top_eigenvalue"] < 0]
            if neg:
                axes[0][k].scatter(*zip(*neg), facecolors="none", edgecolors=COLORS[n], s=18)
            if traced:
                _curve(axes[1][k], group, "hessian", "trace", COLORS[n], LABELS[n], marker=".")
        axes[0][k].set(title=f"{title}: |top Hessian eigenvalue|", xlabel="step",
                       yscale="log")
        axes[0][k].legend(fontsize=7)
        if traced:
            axes[1][k].set(title=f"{title}: Hessian trace (Hutchinson)", xlabel="step")
            axes[1][k].set_yscale("symlog", linthresh=1.0)
    return _save(fig, out / "curvature.png")


FIGURES = {"fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig7": fig7, "fig8": fig8,
           "fig9": fig9, "fig10": fig10, "fig11": fig11, "fig12": fig12, "fig13": fig13,
           "fig14": fig14, "curvature": curvature}


def make_figures(suite_dir: str | os.PathLike, runs: dict[str, Run] | None = None
                 ) -> dict[str, Path]:
    """Every figure that the suite's saved runs allow, as PNGs in ``suite_dir``."""
    out = Path(suite_dir)
    runs = load_suite(out) if runs is None else runs
    groups = seed_groups(runs)
    made = {}
    for name, fn in FIGURES.items():
        path = fn(groups, out)
        if path is not None:
            made[name] = path
    return made


def plot_runs(runs: list[Run], out: Path, title: str = "") -> Path:
    """One summary PNG for an ad-hoc set of runs (the ics / landscape / lr-sweep / lp
    commands): training curve, test accuracy, ICS cosine and effective beta-smoothness."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for run in runs:
        label = f"{LABELS.get(run.config.norm, run.config.norm)}, lr {run.config.lr:g}"
        key = "acc" if run.of("train") and "acc" in run.of("train")[0] else "loss"
        xs, ys = _finite(*run.series("train", key))
        line, = axes[0].plot(xs, ys, label=label)
        c = line.get_color()
        xs, ys = _finite(*run.series("test", "acc"))
        axes[1].plot(xs, ys, marker=".", color=c, label=label)
        for layer in run.config.ics_layers:
            xs, ys = _finite(*run.series("ics", "cosine", layer=layer))
            axes[2].plot(xs, ys, color=c, label=f"{label}, layer #{layer}")
        xs, ys = _finite(*run.series("landscape", "beta_smoothness", direction="gradient"))
        axes[3].plot(xs, ys, color=c, label=label)
    axes[0].set(title="training " + ("accuracy" if key == "acc" else "loss"), xlabel="step")
    if key == "loss":
        axes[0].set_yscale("log")
    axes[1].set(title="test accuracy", xlabel="step")
    axes[2].set(title="ICS: cos(G, G')", xlabel="step")
    axes[3].set(title='"effective" beta-smoothness', xlabel="step", yscale="log")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)
