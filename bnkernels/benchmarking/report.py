"""Result files: ``<out>/<gpu>/<date>.json`` (the document :func:`.suite.run` returns), a
markdown report beside it (targets, host time per call, training steps, kernel goals and
tables), and PNGs drawn from the JSON alone: speedup by shape and a bandwidth roofline (kernel
rows of the goals' timing mode), and the ratios to torch of the overhead and e2e sections.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .providers import BNKERNELS, COMPILE_BASELINE, OPS, PASSES, PROVIDERS
from .suite import row_key


def _ops(rows) -> tuple:
    """The built-in ops in their order, then any other family's ops the rows have."""
    return OPS + tuple(sorted({r["op"] for r in rows} - set(OPS)))


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; a CPU run -> "cpu"."""
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def partial_path(result: dict, out: Path) -> Path:
    """Where :func:`write_partial` keeps a run's finished sections until :func:`write`."""
    return Path(out) / device_slug(result["device"]) / f"{result['date'][:10]}-partial.json"


def write_partial(result: dict, out: Path) -> Path:
    """Write a partial result document (the sections finished so far), atomically."""
    path = partial_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return path


def write(result: dict, out: Path) -> dict[str, Path]:
    """Write the JSON, markdown and plots under ``out/<device>/`` (and remove the run's
    partial file); returns their paths."""
    folder = Path(out) / device_slug(result["device"])
    folder.mkdir(parents=True, exist_ok=True)
    partial_path(result, out).unlink(missing_ok=True)
    day = result["date"][:10]  # the run's date (UTC), YYYY-MM-DD
    stem, n = day, 1
    while (folder / f"{stem}.json").exists():
        n += 1
        stem = f"{day}-{n}"
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    figures = []  # (name, function): a figure only where its section has rows
    if result.get("overhead") or result.get("e2e"):
        figures.append(("host", plot_host))
    if result["rows"]:
        figures += [("speedup", plot_speedup), ("roofline", plot_roofline)]
    plots = {}
    try:
        for name, draw in figures:
            path = folder / f"{stem}-{name}.png"
            draw(result, path)
            paths[f"{name}_png"] = path
            plots[name] = path.name
    except ImportError as e:  # matplotlib is in the "experiments" extra
        plots = {"error": f"no plots: {e}"}
        for name, _ in figures:
            paths.pop(f"{name}_png", None)
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
    lines.append(f"Sections: {', '.join(result.get('sections', []))}; "
                 f"{result.get('elapsed_s', '?')} s in all.")
    lines.append("")
    if result.get("truncated"):
        lines += [f"> **Truncated run**: {result['truncated']}.", ""]
    if not result["performance_claims"]:
        lines += ["> **Smoke run: no performance claims.** Tiny sizes; on the CPU Triton runs in "
                  "its interpreter and times are CPU wall-clock. This checks the runner, not "
                  "the kernels.", ""]
    from .cpu_path import markdown as cpu_markdown

    lines += (_targets_md(result) + _overhead_md(result) + _stack_md(result)
              + _e2e_md(result) + cpu_markdown(result, _table))
    if plots:
        lines += [f"![{k}]({v})" if k != "error" else v for k, v in plots.items()] + [""]
    if "kernels" not in result.get("sections", ["kernels"]):
        return "\n".join(lines + _skipped_md(result))
    lines += ["## Kernels", ""]
    lines.append(f"Timing: {result['timing']['method']}. Device-to-device copy bandwidth "
                 f"measured in this run: **{result['copy_bw_gbps']:.1f} GB/s** ("
                 f"{result.get('copy_bw_method', 'eager copy_')}; the same in every mode). "
                 "Bytes per pass (B = bytes of x): " + ", ".join(
                     f"{k} {v['bytes']} (ideal {v['ideal']})"
                     for k, v in result["traffic_model"].items()) + ".")
    lines.append("")
    mode = result["summary"].get("mode")
    lines += ["### Goals" + (f" ({mode} mode)" if mode else ""), "",
              "| goal | test | target | measured | worst | met |", "|---|---|---|---|---|---|"]
    for g in result["summary"]["goals"]:
        worst = g["worst"]
        w = f"{worst['value']:.3g} ({worst['where']})" if worst else "-"
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['test']} (n={g['n']}) | {g['target']} | "
                     f"{_goal_value(g)} | {w} | {met} |")
    lines.append("")

    rows = result["rows"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines += ["### Results", "",
              "Each cell: median time in us (effective GB/s under the traffic model). Timing "
              "mode in each title: eager (CUDA events around eager calls) or graph (CUDA-graph "
              "replays: kernel time). The last "
              "columns: bnkernels' speedup over cuDNN and over the compiled baseline (" +
              ", ".join(f"{op}: {b}" for op, b in COMPILE_BASELINE.items()) + "). For "
              "noisy_batch_norm and lp_norm the cudnn, torch-native and torch-compile columns "
              "are plain BatchNorm on the same input.", ""]
    modes = [m for m in ("eager", "graph") if any(r.get("mode", "eager") == m for r in rows)]
    tables = [(op, p, pass_, mode) for op in _ops(rows)
              for p in sorted({r["p"] for r in rows if r["op"] == op},
                              key=lambda v: (v is None, v))
              for pass_ in PASSES for mode in modes]
    for op, p, pass_, mode in tables:
        sel = [r for r in rows if r["op"] == op and r["p"] == p and r["pass"] == pass_
               and r.get("mode", "eager") == mode]
        if not sel:
            continue
        cols = [c for c in providers if any(r["provider"] == c for r in sel)]
        bnk = [c for c in cols if c in BNKERNELS]
        title = f"{op}" + (f" (p={p})" if p else "") + f", {pass_} ({mode})"
        head = ["shape", "dtype", "layout", *cols]
        head += [f"{c} vs cudnn" for c in bnk] + [f"{c} vs compile" for c in bnk]
        lines += [f"#### {title}", "", "| " + " | ".join(head) + " |",
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
    return "\n".join(lines + _skipped_md(result))


def _skipped_md(result: dict) -> list[str]:
    if not result["skipped"]:
        return []
    lines = ["## Skipped", ""]
    for s in result["skipped"]:
        what = " ".join(str(s[k]) for k in ("section", "provider", "model", "op", "pass",
                                            "shape_name", "dtype", "layout") if s.get(k))
        lines.append(f"- {what or s.get('shape', '')}: {s['reason']}")
    return lines + [""]


def _verdict(met) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def _table(title: str, intro: str, columns: list[str], rows: list[list]) -> list[str]:
    """A markdown section: its title, an intro paragraph and a table (cells as given)."""
    lines = [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    return lines + [""]


def _targets_md(result: dict) -> list[str]:
    targets = result.get("targets") or []
    if not targets:
        return []
    return _table(
        "Targets",
        "Measured in this run; met = yes / **no** on a full GPU run, '-' where not judged "
        "(smoke or CPU run) or not measured.",
        ["target", "measured", "limit", "met", "where", "test"],
        [[t["name"], "not measured" if t["value"] is None else f"{t['value']:.3f}",
          f"{t['compare']} {t['limit']}", _verdict(t["met"]), t["where"] or "-", t["test"]]
         for t in targets])


def _overhead_md(result: dict) -> list[str]:
    rows = result.get("overhead") or []
    if not rows:
        return []
    info = result.get("overhead_timing", {})
    cells = []
    for prov, op, p in dict.fromkeys((r["provider"], r["op"], r["p"]) for r in rows):
        by = {r["pass"]: r for r in rows if (r["provider"], r["op"], r["p"]) == (prov, op, p)}
        row = [prov, op + (f" (p={p})" if p else "")]
        for pass_ in ("fwd", "fwd+bwd"):
            r = by.get(pass_)
            row += ["-", "-"] if r is None else [f"{r['us_per_call']:.1f}",
                                                 _num(r["ratio_vs_torch"])]
        cells.append(row)
    return _table(
        "Host time per call (overhead)",
        f"{info.get('method', '')}; x {'x'.join(map(str, info.get('shape', [])))} "
        f"{info.get('dtype', '')}. Ratio: to F.batch_norm ({info.get('baseline', '')}, "
        "plain BatchNorm) in the same pass. fwd: training forward with autograd "
        "recording; fwd+bwd: forward and backward.",
        ["provider", "op", "fwd us/call", "fwd ratio", "fwd+bwd us/call", "fwd+bwd ratio"],
        cells)


def _stack_md(result: dict) -> list[str]:
    rows = result.get("stack") or []
    if not rows:
        return []
    info = result.get("stack_timing", {})
    limits = info.get("limits", {})
    return _table(
        "The Python stack above the launches (stack)",
        f"bnkernels: {info.get('bnkernels', '')}; torch: {info.get('torch', '')}. "
        f"{info.get('method', '')}; {'x'.join(map(str, info.get('shape', [])))} "
        f"{info.get('dtype', '')} on {info.get('device', '')}. Goals: module <= "
        f"{limits.get('module')}x torch's module, functional <= "
        f"{limits.get('functional')}x F.batch_norm (a CPU proxy: the GPU "
        "launch itself is not in it). Emulated: every launch through the direct launch path "
        "(guards, addresses, the launcher's C entry called, itself a no-op), the goal the "
        "same; launches: per call; us/launch: one warm direct launch of the row's first "
        "kernel alone, median [min, max].",
        ["api", "op", "pass", "us/call", "torch us/call", "ratio", "goal", "emulated us/call",
         "emulated ratio", "launches", "us/launch"],
        [[r["api"], r["op"], r["pass"], f"{r['us_per_call']:.1f}",
          f"{r['torch_us_per_call']:.1f}", f"{r['ratio_vs_torch']:.2f}",
          f"<= {r['limit']} {'met' if r['met'] else 'NOT MET'}", *_stack_emulated(r)]
         for r in rows])


def _stack_emulated(r: dict) -> list[str]:
    """The emulated-launch cells of a stack row ('-' in results written before them)."""
    if r.get("us_per_call_emulated") is None:
        return ["-"] * 4
    spread = r.get("us_per_launch_spread") or [None, None]
    launch = _num(r.get("us_per_launch"), "{:.2f}")
    if None not in spread:
        launch += f" [{spread[0]:.2f}, {spread[1]:.2f}]"
    return [f"{r['us_per_call_emulated']:.1f}",
            f"{r['ratio_emulated']:.2f} {'met' if r['met_emulated'] else 'NOT MET'}",
            _num(r.get("launches"), "{}"), launch]


def _e2e_md(result: dict) -> list[str]:
    rows = result.get("e2e") or []
    if not rows:
        return []
    info = result.get("e2e_timing", {})
    return _table(
        "Training step (e2e)",
        f"{info.get('method', '')}. cuDNN: {info.get('cudnn', '')}. Ratio: step time over "
        "torch.nn.BatchNorm2d's (same model, dtype, layout); first loss checked against "
        "torch's (same weights, same batch). norm MB: the bytes a step moves through its "
        "normalization sites (BatchNorm, and the ReLUs and residual adds a fused site takes "
        "in), modeled per element (bnkernels.benchmarking.e2e.SITE_ACCESSES); '-' for "
        "compiled models.",
        ["model", "dtype", "layout", "provider", "ms/step", "ratio vs torch", "steps",
         "first loss", "check", "norm MB"],
        [[r["model"], r["dtype"], r["layout"], r["provider"], f"{r['median_ms']:.2f}",
          _num(r["ratio_vs_torch"], "{:.3f}"), r["steps"], f"{r['loss_first']:.4f}",
          r["check"] or "-", _num(r.get("norm_MB"), "{:.1f}")] for r in rows])


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


def _finish(plt, fig, result: dict, title: str, smoke: str, rect: tuple, path: Path) -> None:
    """The device and ``title`` over the figure (``smoke`` named where the run makes no
    performance claims), laid out in ``rect``, saved to ``path`` and closed."""
    note = "" if result["performance_claims"] else f" ({smoke}: no performance claims)"
    fig.suptitle(f"{result['device']}: {title}{note}", fontsize=10)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kernel_rows(result: dict) -> tuple[list[dict], str]:
    """The kernel rows of the goals' timing mode (graph where run) and that mode."""
    mode = result["summary"].get("mode") or "eager"
    return [r for r in result["rows"] if r.get("mode", "eager") == mode], mode


def plot_speedup(result: dict, path: Path) -> None:
    """Speedup over the baseline (cudnn where it ran, else torch-native) per shape: one panel
    per (op, pass), geomean over dtype, layout and p; shapes in increasing size."""
    plt = _pyplot()
    rows, mode = _kernel_rows(result)
    baseline = "cudnn" if any(r["provider"] == "cudnn" for r in rows) else "torch-native"
    panels = [(op, pass_) for op in _ops(rows) for pass_ in PASSES
              if any(r["op"] == op and r["pass"] == pass_ for r in rows)]
    ops = [op for op in _ops(rows) if any(op == o for o, _ in panels)]
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
    _finish(plt, fig, result, f"speedup over {baseline} by shape (geomean over dtype, layout, "
            f"p; {mode} timing)", "CPU smoke run", (0, 0.05, 1, 0.97), path)


def plot_roofline(result: dict, path: Path) -> None:
    """Achieved GB/s (compulsory-traffic model) of every row against the bytes moved, one
    panel per pass, under the copy-bandwidth roof measured in the same run."""
    plt = _pyplot()
    rows, mode = _kernel_rows(result)
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
    _finish(plt, fig, result, f"achieved bandwidth ({mode} timing) under the copy roof measured "
            "in the same run", "CPU smoke run", (0, 0.08, 1, 0.95), path)


def plot_host(result: dict, path: Path) -> None:
    """Bars of time over torch's: left, host time per call over F.batch_norm (overhead, per
    provider and op, fwd and fwd+bwd); right, training-step time over torch's BatchNorm (e2e,
    per model, dtype and layout, one bar per bnkernels provider); dashed lines: the targets."""
    from .targets import OVERHEAD_LIMITS

    plt = _pyplot()
    over, e2e = result.get("overhead") or [], result.get("e2e") or []
    panels = [p for p, rows in (("overhead", over), ("e2e", e2e)) if rows]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(7.5 * len(panels), 4.6))
    for ax, panel in zip(axes[0], panels):
        if panel == "overhead":
            labels = list(dict.fromkeys(
                f"{r['provider']}\n{r['op']}" + (f" p={r['p']}" if r["p"] else "")
                for r in over))
            series = {pass_: {f"{r['provider']}\n{r['op']}" + (f" p={r['p']}" if r["p"] else ""):
                              r["ratio_vs_torch"] for r in over if r["pass"] == pass_}
                      for pass_ in ("fwd", "fwd+bwd")}
            colors = {"fwd": "#1f77b4", "fwd+bwd": "#d62728"}
            limits = OVERHEAD_LIMITS
            title = "host time per call / F.batch_norm"
        else:
            labels = list(dict.fromkeys(f"{r['model']}\n{r['dtype']} {r['layout']}"
                                        for r in e2e))
            provs = [p for p in dict.fromkeys(r["provider"] for r in e2e) if p != "torch"]
            series = {p: {f"{r['model']}\n{r['dtype']} {r['layout']}": r["ratio_vs_torch"]
                          for r in e2e if r["provider"] == p} for p in provs}
            colors = {p: COLORS.get(p, "#2ca02c") for p in provs}
            limits = {}
            title = "training step time / torch BatchNorm"
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ys = [values.get(lab) or float("nan") for lab in labels]
            ax.bar(xs, ys, width, label=name, color=colors.get(name))
        ax.axhline(1.0, color="k", lw=0.8)
        for name, limit in limits.items():
            ax.axhline(limit, color=colors[name], lw=1, ls="--", label=f"{name} target {limit}")
        if panel == "overhead":
            ax.set_yscale("log")
        else:
            lows = [v for values in series.values() for v in values.values() if v]
            ax.set_ylim(bottom=min([0.5] + [0.9 * v for v in lows]))
            for (arch, limit), ls in zip(result.get("e2e_timing", {}).get("limits", {}).items(),
                                         (":", "-.", "--")):
                ax.axhline(limit, color="k", lw=0.8, ls=ls, label=f"{arch} target {limit}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("time / torch's (lower is better)")
        ax.legend(fontsize=7)
    _finish(plt, fig, result, "what users feel, against torch", "smoke run", (0, 0, 1, 0.95),
            path)


__all__ = ["device_slug", "markdown", "partial_path", "plot_host", "plot_roofline",
           "plot_speedup", "write", "write_partial"]
