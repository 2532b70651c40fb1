"""The paper's figures, drawn only from saved runs (config.json + metrics.jsonl).

A suite folder (written by ``bnkernels reproduce``) holds ``suite.json`` naming its runs
``<model>-<norm>-lr<lr>`` (e.g. ``vgg-batchnorm-lr0.1``, ``dln-l1-lr1e-06``). Each ``fig*``
function draws one figure of the paper from whichever of its runs exist and returns the PNG's
path, or None when none of the runs it needs is there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .activations import QUANTILES, moment_changes  # noqa: E402
from .train import RunConfig, read_metrics  # noqa: E402

LABELS = {"none": "Standard", "batchnorm": "Standard + BatchNorm", "noisy": 'Standard + "Noisy" BN',
          "l1": "l1 norm", "l2": "l2 norm", "linf": "l_inf norm", "torch": "torch BatchNorm"}
COLORS = {"none": "tab:blue", "batchnorm": "tab:red", "noisy": "tab:green", "l1": "tab:purple",
          "l2": "tab:orange", "linf": "tab:brown", "torch": "tab:gray"}
LP_NORMS = ("none", "batchnorm", "l1", "l2", "linf")


def run_name(model: str, norm: str, lr: float) -> str:
    return f"{model}-{norm}-lr{lr:g}"


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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(runs: dict[str, Run], model: str, lr: float, norms) -> list[tuple[str, Run]]:
    return [(n, runs[run_name(model, n, lr)]) for n in norms if run_name(model, n, lr) in runs]


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _train_curve(ax, run: Run, norm: str, key: str = "acc", kind: str = "train", **kw):
    xs, ys = _finite(*run.series(kind, key))
    ax.plot(xs, ys, color=COLORS.get(norm), label=kw.pop("label", LABELS.get(norm, norm)), **kw)


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


def fig1(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 1: VGG with and without BatchNorm: (a) training accuracy at lr 0.1 and 0.5,
    (b) test accuracy, (c) activation distributions of one layer."""
    sel = [(n, lr, runs[run_name("vgg", n, lr)]) for lr in (0.1, 0.5) for n in ("none", "batchnorm")
           if run_name("vgg", n, lr) in runs]
    if not sel:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for n, lr, run in sel:
        style = "-" if lr == 0.1 else "--"
        _train_curve(axes[0], run, n, ls=style, label=f"{LABELS[n]}, lr {lr:g}")
        _train_curve(axes[1], run, n, kind="test", ls=style, marker=".",
                     label=f"{LABELS[n]}, lr {lr:g}")
    axes[0].set(title="(a) training accuracy (per minibatch)", xlabel="step", ylabel="accuracy")
    axes[1].set(title="(b) test accuracy", xlabel="step", ylabel="accuracy")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    for ax, n in zip(axes[2:], ("none", "batchnorm")):
        run = runs.get(run_name("vgg", n, 0.1))
        if run is None:
            ax.set_visible(False)
            continue
        layer = run.config.act_layers[-1] if run.config.act_layers else 1
        _distribution(ax, run, layer, f"(c) {LABELS[n]}: layer #{layer} activation")
    return _save(fig, out / "fig1.png")


def fig2(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 2: standard, BatchNorm and noisy BatchNorm: training accuracy and activation
    distributions of layers at the same depth."""
    sel = _pick(runs, "vgg", 0.1, ("none", "batchnorm", "noisy"))
    if not sel:
        return None
    layers = sel[0][1].config.act_layers
    fig, axes = plt.subplots(len(layers), 1 + len(sel), figsize=(4 * (1 + len(sel)),
                                                                  2.8 * len(layers)),
                             squeeze=False)
    for n, run in sel:
        _train_curve(axes[0][0], run, n)
    axes[0][0].set(title="training accuracy", xlabel="step", ylabel="accuracy")
    axes[0][0].legend(fontsize=7)
    for r in range(1, len(layers)):
        axes[r][0].set_visible(False)
    for c, (n, run) in enumerate(sel, start=1):
        for r, layer in enumerate(layers):
            _distribution(axes[r][c], run, layer, f"{LABELS[n]}: layer #{layer}")
    return _save(fig, out / "fig2.png")


def _ics_axes(axes, sel, layers, title):
    for k, layer in enumerate(layers):
        for n, run in sel:
            xs, cos = _finite(*run.series("ics", "cosine", layer=layer))
            axes[0][k].plot(xs, cos, color=COLORS[n], label=LABELS[n])
            xs, l2 = _finite(*run.series("ics", "l2", layer=layer))
            axes[1][k].plot(xs, l2, color=COLORS[n], label=LABELS[n])
        axes[0][k].set(title=f"{title}: layer #{layer}, cos(G, G')", xlabel="step")
        axes[1][k].set(title=f"{title}: layer #{layer}, ||G - G'||", xlabel="step", yscale="log")
        axes[0][k].legend(fontsize=7)


def fig3(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 3: ICS (Definition 2.1) with and without BatchNorm: VGG (lr 0.1) and DLN (lr 1e-7,
    or 1e-6 when the suite has no 1e-7 runs)."""
    vgg = _pick(runs, "vgg", 0.1, ("none", "batchnorm"))
    dln_lr = 1e-7 if _pick(runs, "dln", 1e-7, ("none", "batchnorm")) else 1e-6
    dln = _pick(runs, "dln", dln_lr, ("none", "batchnorm"))
    panels = [(sel, sel[0][1].config.ics_layers, f"{m} lr {lr:g}")
              for sel, m, lr in ((vgg, "VGG", 0.1), (dln, "DLN", dln_lr)) if sel]
    if not panels:
        return None
    ncol = sum(len(p[1]) for p in panels)
    fig, axes = plt.subplots(2, ncol, figsize=(4.2 * ncol, 6.5), squeeze=False)
    c = 0
    for sel, layers, title in panels:
        sub = [[axes[0][c + k] for k in range(len(layers))],
               [axes[1][c + k] for k in range(len(layers))]]
        _ics_axes(sub, sel, layers, title)
        c += len(layers)
    return _save(fig, out / "fig3.png")


def _landscape_axes(axes, sel, direction="gradient"):
    for n, run in sel:
        recs = run.of("landscape", direction=direction)
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        kw = dict(color=COLORS[n], alpha=0.3, lw=0)
        lo = [r["loss_min"] for r in recs]
        hi = [r["loss_max"] for r in recs]
        glo = [max(r["grad_diff_min"], 1e-30) for r in recs]
        ghi = [r["grad_diff_max"] for r in recs]
        for ax, a, b in ((axes[0], lo, hi), (axes[1], glo, ghi)):
            ax.fill_between(steps, a, b, label=LABELS[n], **kw)
            ax.plot(steps, a, color=COLORS[n], lw=0.7)  # the edges show a band too thin to fill
            ax.plot(steps, b, color=COLORS[n], lw=0.7)
        axes[2].plot(steps, [r["beta_smoothness"] for r in recs], color=COLORS[n],
                     label=LABELS[n])
    axes[0].set(title="(a) loss landscape", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="(b) gradient predictiveness", xlabel="step",
                ylabel="||grad L(w) - grad L(w - eta g)||", yscale="log")
    axes[2].set(title='(c) "effective" beta-smoothness', xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)


def _landscape_fig(sel, path: Path, suptitle: str, directions=("gradient",)) -> Path:
    fig, axes = plt.subplots(len(directions), 3, figsize=(14, 3.8 * len(directions)),
                             squeeze=False)
    for row, d in zip(axes, directions):
        _landscape_axes(row, sel, d)
        if len(directions) > 1:
            row[0].set_ylabel(f"{d} direction: loss")
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def fig4(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 4: VGG landscape along the gradient (and along random directions if probed)."""
    sel = _pick(runs, "vgg", 0.1, ("none", "batchnorm"))
    if not sel:
        return None
    dirs = tuple(d for d in ("gradient", "random") if any(r.of("landscape", direction=d)
                                                         for _, r in sel))
    return _landscape_fig(sel, out / "fig4.png", "VGG, lr 0.1", dirs or ("gradient",))


def fig7(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 7: mean and variance of random activations of select layers over training, for
    the standard, BatchNorm and noisy BatchNorm networks."""
    sel = _pick(runs, "vgg", 0.1, ("none", "batchnorm", "noisy"))
    if not sel:
        return None
    layers = sel[0][1].config.act_layers
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6), squeeze=False)
    for k, layer in enumerate(layers):
        for n, run in sel:
            recs = [r for r in run.of("act", layer=layer)
                    if r["step"] % max(run.config.act_every, 1) == 0]
            steps = [r["step"] for r in recs]
            axes[0][k].plot(steps, [r["mean"][0] for r in recs], color=COLORS[n],
                            label=LABELS[n])
            axes[1][k].plot(steps, [r["var"][0] for r in recs], color=COLORS[n],
                            label=LABELS[n])
        axes[0][k].set(title=f"layer #{layer}: mean", xlabel="step")
        axes[1][k].set(title=f"layer #{layer}: variance", xlabel="step", yscale="log")
        axes[0][k].legend(fontsize=7)
    return _save(fig, out / "fig7.png")


def fig8(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 8: change of the first two moments of activations between successive steps."""
    sel = _pick(runs, "vgg", 0.1, ("none", "batchnorm", "noisy"))
    if not sel:
        return None
    layers = sel[0][1].config.act_layers
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6), squeeze=False)
    for k, layer in enumerate(layers):
        for n, run in sel:
            ch = moment_changes(run.of("act", layer=layer))
            steps = [c["step"] for c in ch]
            axes[0][k].plot(steps, [max(c["d_mean"][0], 1e-12) for c in ch], color=COLORS[n],
                            label=LABELS[n], marker=".", lw=0.8)
            axes[1][k].plot(steps, [max(c["d_var"][0], 1e-12) for c in ch], color=COLORS[n],
                            label=LABELS[n], marker=".", lw=0.8)
        axes[0][k].set(title=f"layer #{layer}: |change of mean|", xlabel="step", yscale="log")
        axes[1][k].set(title=f"layer #{layer}: |change of variance|", xlabel="step",
                       yscale="log")
        axes[0][k].legend(fontsize=7)
    return _save(fig, out / "fig8.png")


def fig9(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 9: DLN landscape with and without BatchNorm (lr 1e-6)."""
    sel = _pick(runs, "dln", 1e-6, ("none", "batchnorm"))
    return _landscape_fig(sel, out / "fig9.png", "Deep linear network, lr 1e-6") if sel else None


def fig10(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 10: gradient predictiveness and loss against the distance moved along the
    gradient, early / middle / late in training (VGG, lr 0.1)."""
    sel = _pick(runs, "vgg", 0.1, ("none", "batchnorm"))
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


def fig11(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 11: VGG landscape with l_p normalizations, beside BatchNorm and standard."""
    sel = _pick(runs, "vgg", 0.1, LP_NORMS)
    return _landscape_fig(sel, out / "fig11.png", "VGG, l_p normalization") if sel else None


def fig12(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 12: DLN landscape with l_p normalizations, beside BatchNorm and standard."""
    sel = _pick(runs, "dln", 1e-6, LP_NORMS)
    return _landscape_fig(sel, out / "fig12.png", "DLN, l_p normalization") if sel else None


def fig13(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 13: training with l_p normalizations: VGG training and test accuracy, DLN loss."""
    vgg = _pick(runs, "vgg", 0.1, LP_NORMS)
    dln = _pick(runs, "dln", 1e-6, LP_NORMS)
    if not vgg and not dln:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for n, run in vgg:
        _train_curve(axes[0], run, n)
        _train_curve(axes[1], run, n, kind="test", marker=".")
    for n, run in dln:
        _train_curve(axes[2], run, n, key="loss")
    axes[0].set(title="VGG: training accuracy", xlabel="step")
    axes[1].set(title="VGG: test accuracy", xlabel="step")
    axes[2].set(title="DLN: training loss (lr 1e-6)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, out / "fig13.png")


def fig14(runs: dict[str, Run], out: Path) -> Path | None:
    """Fig. 14: activation distributions with l_p normalizations (VGG)."""
    sel = _pick(runs, "vgg", 0.1, LP_NORMS)
    if not sel:
        return None
    layer = sel[0][1].config.act_layers[-1] if sel[0][1].config.act_layers else 1
    fig, axes = plt.subplots(1, len(sel), figsize=(3.6 * len(sel), 3.4), squeeze=False)
    for ax, (n, run) in zip(axes[0], sel):
        _distribution(ax, run, layer, f"{LABELS[n]}: layer #{layer}")
    return _save(fig, out / "fig14.png")


FIGURES = {"fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig7": fig7, "fig8": fig8,
           "fig9": fig9, "fig10": fig10, "fig11": fig11, "fig12": fig12, "fig13": fig13,
           "fig14": fig14}


def make_figures(suite_dir: str | os.PathLike, runs: dict[str, Run] | None = None
                 ) -> dict[str, Path]:
    """Every figure that the suite's saved runs allow, as PNGs in ``suite_dir``."""
    out = Path(suite_dir)
    runs = load_suite(out) if runs is None else runs
    made = {}
    for name, fn in FIGURES.items():
        path = fn(runs, out)
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
