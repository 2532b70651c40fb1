"""Result files: ``<out>/<gpu>/<date>.json`` (the document :func:`.suite.run` returns), a
markdown table beside it, and two PNGs drawn from the JSON alone: speedup by shape, and a
bandwidth roofline (achieved GB/s of every row under the measured copy-bandwidth roof).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .providers import BNKERNELS, COMPILE_BASELINE, OPS, PASSES, PROVIDERS
from .suite import row_key


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; a CPU run -> "cpu"."""
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def write(result: dict, out: Path) -> dict[str, Path]:
    """Write the JSON, markdown and plots under ``out/<device>/``; returns their paths."""
    folder = Path(out) / device_slug(result["device"])
    folder.mkdir(parents=True, exist_ok=True)
    day = result["date"][:10]  # the run's date (UTC), YYYY-MM-DD
    stem, n = day, 1
    while (folder / f"{stem}.json").exists():
        n += 1
        stem = f"{day}-{n}"
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md",
             "speedup_png": folder / f"{stem}-speedup.png",
             "roofline_png": folder / f"{stem}-roofline.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    plots = {}
    try:
        plot_speedup(result, paths["speedup_png"])
        plot_roofline(result, paths["roofline_png"])
        plots = {"speedup": paths["speedup_png"].name, "roofline": paths["roofline_png"].name}
    except ImportError as e:  # matplotlib is in the "experiments" extra
        plots = {"error": f"no plots: {e}"}
        del paths["speedup_png"], paths["roofline_png"]
    paths["markdown"].write_text(markdown(result, plots))
    return paths


# ----------------------------------------------------------------------------- markdown


def _num(v, fmt="{:.2f}", none="-") -> str:
    return none if v is None else fmt.format(v)


def _goal_value(g: dict) -> str:
    if g["value"] is None:
        return "not measured"
    if "frac" in g["goal"]:
        return f"{100 * g['value']:.1f}%"
    return f"{g['value']:.3f}x" if "over" in g["goal"] else f"{g['value']:.2f}x"


def markdown(result: dict, plots: dict | None = None) -> str:
    lines = [f"# bnkernels benchmarks: {result['device']}", ""]
    lines.append(f"{result['date']}; torch {result['torch']}, triton {result['triton']}, cuDNN "
                 f"{result['cudnn']}, CUDA {result['cuda']}; bnkernels commit "
                 f"{result['bnkernels_commit']}; suite `{result['suite']}`.")
    lines.append("")
    lines.append(f"Timing: {result['timing']['method']}. Device-to-device copy bandwidth "
                 f"measured in this run: **{result['copy_bw_gbps']:.1f} GB/s**. Bytes per pass "
                 "(B = bytes of x): " + ", ".join(
                     f"{k} {v['bytes']} (ideal {v['ideal']})"
                     for k, v in result["traffic_model"].items()) + ".")
    lines.append("")
    if result.get("truncated"):
        lines += [f"> **Truncated run**: {result['truncated']}.", ""]
    if not result["performance_claims"]:
        lines += ["> **CPU smoke run: no performance claims.** Triton runs in its interpreter "
                  "and times are CPU wall-clock; this checks the runner, not the kernels.", ""]
    lines += ["## Goals", "", "| goal | test | target | measured | worst | met |",
              "|---|---|---|---|---|---|"]
    for g in result["summary"]["goals"]:
        worst = g["worst"]
        w = f"{worst['value']:.3g} ({worst['where']})" if worst else "-"
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['test']} (n={g['n']}) | {g['target']} | "
                     f"{_goal_value(g)} | {w} | {met} |")
    lines.append("")
    if plots:
        lines += [f"![{k}]({v})" if k != "error" else v for k, v in plots.items()] + [""]

    rows = result["rows"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines += ["## Results", "",
              "Each cell: median time in us (effective GB/s under the traffic model). The last "
              "columns: bnkernels' speedup over cuDNN and over the compiled baseline (" +
              ", ".join(f"{op}: {b}" for op, b in COMPILE_BASELINE.items()) + "). For "
              "noisy_batch_norm and lp_norm the cudnn, torch-native and torch-compile columns "
              "are plain BatchNorm on the same input.", ""]
    for op in OPS:
        ps = sorted({r["p"] for r in rows if r["op"] == op}, key=lambda v: (v is None, v))
        for p in ps:
            for pass_ in PASSES:
                sel = [r for r in rows if r["op"] == op and r["p"] == p and r["pass"] == pass_]
                if not sel:
                    continue
                cols = [c for c in providers if any(r["provider"] == c for r in sel)]
                bnk = [c for c in cols if c in BNKERNELS]
                title = f"{op}" + (f" (p={p})" if p else "") + f", {pass_}"
                head = ["shape", "dtype", "layout", *cols]
                head += [f"{c} vs cudnn" for c in bnk] + [f"{c} vs compile" for c in bnk]
                lines += [f"### {title}", "", "| " + " | ".join(head) + " |",
                          "|" + "---|" * len(head)]
                groups: dict[tuple, dict] = {}
                for r in sel:
                    groups.setdefault(row_key(r), {})[r["provider"]] = r
                for by in groups.values():
                    first = next(iter(by.values()))
                    cells = [first["shape_name"], first["dtype"], first["layout"]]
                    for c in cols:
                        r = by.get(c)
                        cells.append("-" if r is None else
                                     f"{r['median_us']:.1f} ({r['gbps']:.3g})"
                                     + (" FAIL" if r["check"] == "FAIL" else ""))
                    for field in ("speedup_vs_cudnn", "speedup_vs_compile"):
                        cells += [_num(by[c][field] if c in by else None) for c in bnk]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
    if result["skipped"]:
        lines += ["## Skipped", ""]
        for s in result["skipped"]:
            what = " ".join(str(s[k]) for k in ("provider", "op", "pass", "shape_name", "dtype",
                                                "layout") if s.get(k))
            lines.append(f"- {what or s.get('shape', '')}: {s['reason']}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One color per provider, the same in every figure: vendor/compiler baselines in cool colors,
# bnkernels in warm ones.
COLORS = {"cudnn": "#1f77b4", "torch-native": "#17becf", "torch-compile": "#9467bd",
          "eager": "#7f7f7f", "eager-compile": "#bcbd22", "bnkernels-triton": "#d62728",
          "bnkernels-cuda": "#ff7f0e", "bnkernels-reference": "#8c564b"}


def _legend(fig, axes) -> None:
    """One legend for the figure (each label once), below the panels."""
    seen: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center",
                   ncol=min(len(seen), 8), fontsize=8, frameon=False)


def plot_speedup(result: dict, path: Path) -> None:
    """Speedup over the baseline (cudnn where it ran, else torch-native) per shape: one panel
    per (op, pass), geomean over dtype, layout and p; shapes in increasing size."""
    plt = _pyplot()
    rows = result["rows"]
    baseline = "cudnn" if any(r["provider"] == "cudnn" for r in rows) else "torch-native"
    panels = [(op, pass_) for op in OPS for pass_ in PASSES
              if any(r["op"] == op and r["pass"] == pass_ for r in rows)]
    ops = [op for op in OPS if any(op == o for o, _ in panels)]
    passes = [p for p in PASSES if any(p == q for _, q in panels)]
    fig, axes = plt.subplots(max(1, len(ops)), max(1, len(passes)), squeeze=False,
                             figsize=(4.2 * max(1, len(passes)), 3.6 * max(1, len(ops))))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    colors = {p: COLORS.get(p, "k") for p in providers}
    times: dict[tuple, float] = {(*row_key(r), r["provider"]): r["median_us"] for r in rows}
    for i, op in enumerate(ops):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["pass"] == pass_]
            if not sel:
                ax.set_axis_off()
                ax.set_title(f"{op}, {pass_}: not run", fontsize=9)
                continue
            shapes = sorted({(r["numel"], r["shape_name"]) for r in sel})
            xs = {name: k for k, (_, name) in enumerate(shapes)}
            for prov in providers:
                pts: dict[str, list[float]] = {}
                for r in sel:
                    base = times.get((*row_key(r), baseline))
                    if r["provider"] == prov and base is not None:
                        pts.setdefault(r["shape_name"], []).append(base / r["median_us"])
                if pts and prov != baseline:
                    names = sorted(pts, key=xs.get)
                    ax.plot([xs[n] for n in names],
                            [math.exp(sum(map(math.log, pts[n])) / len(pts[n])) for n in names],
                            "o-", ms=4, lw=1, color=colors[prov], label=prov)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([n for _, n in shapes], rotation=60, ha="right", fontsize=6)
            ax.set_title(f"{op}, {pass_}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"speedup vs {baseline}")
    _legend(fig, axes)
    note = "" if result["performance_claims"] else " (CPU smoke run: no performance claims)"
    fig.suptitle(f"{result['device']}: speedup over {baseline} by shape (geomean over dtype, "
                 f"layout, p){note}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(result: dict, path: Path) -> None:
    """Achieved GB/s (compulsory-traffic model) of every row against the bytes moved, one
    panel per pass, under the copy-bandwidth roof measured in the same run."""
    plt = _pyplot()
    rows = result["rows"]
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)] or list(PASSES)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    colors = {p: COLORS.get(p, "k") for p in providers}
    markers = {"batch_norm": "o", "noisy_batch_norm": "^", "lp_norm": "s"}
    fig, axes = plt.subplots(1, len(passes), squeeze=False, figsize=(4.2 * len(passes), 4.0))
    roof = result["copy_bw_gbps"]
    for j, pass_ in enumerate(passes):
        ax = axes[0][j]
        for prov in providers:
            for op, marker in markers.items():
                sel = [r for r in rows if r["pass"] == pass_ and r["provider"] == prov
                       and r["op"] == op]
                if sel:
                    ax.scatter([r["bytes"] for r in sel], [r["gbps"] for r in sel], s=14,
                               marker=marker, color=colors[prov], alpha=0.75)
        ax.axhline(roof, color="k", lw=1.2, ls="--")
        ax.text(0.02, 0.97, f"copy {roof:.0f} GB/s", transform=ax.transAxes, va="top",
                fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved (model)")
        if j == 0:
            ax.set_ylabel("achieved GB/s")
        model = result["traffic_model"].get(pass_, {})
        ax.set_title(f"{pass_} ({model.get('bytes', '?')} model)", fontsize=9)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colors[p]) for p in providers]
    handles += [Line2D([], [], ls="", marker=m, color="k", mfc="none") for m in markers.values()]
    fig.legend(handles, providers + list(markers), loc="lower center", frameon=False,
               ncol=min(len(handles), 11), fontsize=8)
    note = "" if result["performance_claims"] else " (CPU smoke run: no performance claims)"
    fig.suptitle(f"{result['device']}: achieved bandwidth under the copy roof measured in the "
                 f"same run{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["device_slug", "markdown", "plot_roofline", "plot_speedup", "write"]
