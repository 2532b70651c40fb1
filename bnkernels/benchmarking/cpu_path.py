"""The ``cpu`` section: the cpu backend at the README's main job's shapes, beside torch.

The main job (``bnkernels reproduce --quick``, ``make demo``) trains VGG-11 at 1/8 width on
32x32 images, batch 64, on a CPU. This section measures, on one torch thread, in thread CPU
time (``time.thread_time``: what this process's thread spent, whatever else runs on the
machine), with every configuration interleaved round by round, the median and spread of
several rounds:

* ``ops``: per normalization site of that network (its input shapes), the training forward and
  the forward + backward of torch.nn.BatchNorm2d and of bnkernels' BatchNorm2d, noisy
  BatchNorm2d and LpNorm2d (p = 1, 2, inf) on the cpu backend, fp32 NCHW and channels last;
* ``steps``: the whole SGD step (forward, cross-entropy, backward, update) of the network with
  no normalization, torch's BatchNorm2d, and bnkernels' BatchNorm, noisy BatchNorm and l_p
  normalizations (cpu backend; the reference backend's BatchNorm and noisy BatchNorm too, as
  the "before").

Its targets (judged in a full run, not in ``--quick``): the bnkernels-BatchNorm step at most
1.05x the torch-BatchNorm step; noisy BatchNorm's at most 1.5x the bnkernels-BatchNorm step
(noise generation included); each l_p step at most 1.1x the bnkernels-BatchNorm step.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bnkernels

from ..models import VGG

ARCH, WIDTH, IMAGE, CLASSES = "vgg11", 0.125, 32, 10
LR = 0.05
LIMITS = {"batchnorm": ("torch", 1.05), "noisy": ("batchnorm", 1.5), "l1": ("batchnorm", 1.1),
          "l2": ("batchnorm", 1.1), "linf": ("batchnorm", 1.1)}
# (network's normalization, backend): the step rows, in their interleaved order
STEP_CONFIGS = (("none", None), ("torch", None), ("batchnorm", "cpu"), ("noisy", "cpu"),
                ("l1", "cpu"), ("l2", "cpu"), ("linf", "cpu"), ("batchnorm", "reference"),
                ("noisy", "reference"))
OP_KINDS = ("torch", "batchnorm", "noisy", "l1", "l2", "linf")


@dataclass(frozen=True)
class CpuPathOptions:
    batch: int = 64
    rounds: int = 7  # interleaved rounds; medians and spreads over them
    steps: int = 3  # timed steps per configuration and round (after one untimed)
    op_calls: int = 5  # timed calls per op row and round
    layouts: tuple[str, ...] = ("NCHW", "channels_last")
    judged: bool = True  # a full run at the demo's shapes: the targets are judged

    @classmethod
    def for_run(cls, quick: bool, smoke: bool) -> CpuPathOptions:
        if smoke or quick:  # the runner's check: small and short, nothing judged
            return cls(batch=8, rounds=2, steps=1, op_calls=1, layouts=("NCHW",), judged=False)
        return cls()


def unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the cpu section measures the CPU path (run bench --device cpu)"
    why = bnkernels.available_backends().get("cpu")
    return "; ".join(why) if why else None


def _sites(batch: int) -> list[tuple[int, ...]]:
    """The input shapes of the network's normalization layers, in order."""
    net = VGG(ARCH, norm="torch", width=WIDTH)
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
             for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        net(torch.zeros(batch, 3, IMAGE, IMAGE))
    for h in hooks:
        h.remove()
    return shapes


def _layer(kind: str, C: int) -> torch.nn.Module:
    if kind == "torch":
        return torch.nn.BatchNorm2d(C)
    if kind == "batchnorm":
        return bnkernels.BatchNorm2d(C)
    if kind == "noisy":
        return bnkernels.NoisyBatchNorm2d(C)
    return bnkernels.LpNorm2d(C, {"l1": 1, "l2": 2, "linf": math.inf}[kind])


def _fmt(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _summary(ts: list[float]) -> dict:
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts)}


def run(device: torch.device, opts: CpuPathOptions, log) -> dict:
    """The section's rows: {"ops": [...], "steps": [...]} (see the module docstring)."""
    threads, backend = torch.get_num_threads(), bnkernels.get_backend()
    torch.set_num_threads(1)
    try:
        return {"ops": _ops(opts, log), "steps": _steps(opts, log)}
    finally:
        torch.set_num_threads(threads)
        bnkernels.set_backend(backend)


def _ops(opts: CpuPathOptions, log) -> list[dict]:
    bnkernels.set_backend("cpu")
    g = torch.Generator().manual_seed(0)
    cases = []  # (shape, layout, kind, pass, fn)
    for shape in dict.fromkeys(_sites(opts.batch)):
        for layout in opts.layouts:
            x = torch.randn(shape, generator=g).contiguous(memory_format=_fmt(layout))
            x.requires_grad_(True)
            dy = torch.randn(shape, generator=g).contiguous(memory_format=_fmt(layout))
            for kind in OP_KINDS:
                m = _layer(kind, shape[1]).to(memory_format=_fmt(layout))
                cases.append((shape, layout, kind, "fwd", lambda m=m, x=x: m(x)))
                cases.append((shape, layout, kind, "fwd+bwd",
                              lambda m=m, x=x, dy=dy: m(x).backward(dy)))
    times: list[list[float]] = [[] for _ in cases]
    for fn in (c[4] for c in cases):
        fn()  # warm-up: plans made, memory allocated
    for _ in range(opts.rounds):
        for i, c in enumerate(cases):
            fn = c[4]
            t0 = time.thread_time()
            for _ in range(opts.op_calls):
                fn()
            times[i].append((time.thread_time() - t0) / opts.op_calls * 1e3)
    rows = []
    for (shape, layout, kind, pass_, _), ts in zip(cases, times):
        rows.append({"shape": list(shape), "layout": layout, "provider":
                     "torch" if kind == "torch" else f"bnkernels-cpu {kind}", "op": kind,
                     "pass": pass_, **_summary(ts)})
    for r in rows:
        base = next(b for b in rows if b["op"] == "torch" and b["shape"] == r["shape"]
                    and b["layout"] == r["layout"] and b["pass"] == r["pass"])
        r["ratio_vs_torch"] = r["median_ms"] / base["median_ms"]
    log(f"cpu section: {len(rows)} op rows")
    return rows


def _steps(opts: CpuPathOptions, log) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(opts.batch, 3, IMAGE, IMAGE, generator=g)
    t = torch.randint(0, CLASSES, (opts.batch,), generator=g)
    configs = [(norm, be, layout) for layout in opts.layouts for norm, be in STEP_CONFIGS]
    state = {}
    for norm, be, layout in configs:
        net = VGG(ARCH, norm=norm, width=WIDTH).to(memory_format=_fmt(layout))
        x = x0.contiguous(memory_format=_fmt(layout))
        state[(norm, be, layout)] = (net, torch.optim.SGD(net.parameters(), lr=LR), x)

    def step(key):
        net, opt, x = state[key]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), t).backward()
        opt.step()

    times = {k: [] for k in configs}
    for k in configs:
        if k[1]:
            bnkernels.set_backend(k[1])
        step(k)
    for _ in range(opts.rounds):
        for k in configs:
            if k[1]:
                bnkernels.set_backend(k[1])
            step(k)  # untimed: the backend's plans are made again after set_backend
            t0 = time.thread_time()
            for _ in range(opts.steps):
                step(k)
            times[k].append((time.thread_time() - t0) / opts.steps * 1e3)
    rows = [{"network": norm, "backend": be or "-", "layout": layout, "batch": opts.batch,
             "steps": opts.steps * opts.rounds, **_summary(times[(norm, be, layout)])}
            for norm, be, layout in configs]
    for r in rows:
        def med(norm, be, layout=r["layout"]):
            return next(q["median_ms"] for q in rows if q["network"] == norm
                        and q["backend"] == be and q["layout"] == layout)
        r["ratio_vs_torch"] = r["median_ms"] / med("torch", "-")
        r["ratio_vs_batchnorm"] = r["median_ms"] / med("batchnorm", "cpu")
    log(f"cpu section: {len(rows)} step rows")
    return rows


def settings(opts: CpuPathOptions) -> dict:
    return {"method": f"time.thread_time on one torch thread; {opts.rounds} interleaved rounds "
                      f"of {opts.steps} steps ({opts.op_calls} calls per op row); medians "
                      "and [min, max] over the rounds",
            "model": f"{ARCH} at width {WIDTH}, batch {opts.batch}, {IMAGE}x{IMAGE}, SGD",
            "limits": {k: {"over": v[0], "limit": v[1]} for k, v in LIMITS.items()},
            "judged": opts.judged}


def targets(doc: dict, make) -> list[dict]:
    """The section's targets (``make``: :func:`.targets._target`'s signature)."""
    rows = doc.get("cpu", {}).get("steps") or []
    judged = bool(doc.get("cpu_timing", {}).get("judged"))
    out = []
    for norm, (over, limit) in LIMITS.items():
        for layout in dict.fromkeys(r["layout"] for r in rows) or ("NCHW",):
            row = next((r for r in rows if r["network"] == norm and r["backend"] == "cpu"
                        and r["layout"] == layout), None)
            key = "ratio_vs_torch" if over == "torch" else "ratio_vs_batchnorm"
            out.append(make(f"cpu {norm} step {layout}", "cpu",
                            f"VGG-11/8 SGD step, bnkernels {norm} (cpu backend) / "
                            f"{'torch BatchNorm2d' if over == 'torch' else 'bnkernels BatchNorm'}"
                            " step (thread CPU time)", row and row[key], limit, "<=", judged,
                            row and f"batch {row['batch']} {layout}"))
    return out


def markdown(doc: dict, table) -> list[str]:
    sec = doc.get("cpu") or {}
    if not sec:
        return []
    info = doc.get("cpu_timing", {})
    lines = table(
        "The CPU path (cpu)",
        f"{info.get('model', '')}; {info.get('method', '')}. Ratios: to the torch-BatchNorm "
        "step and to the bnkernels-BatchNorm (cpu backend) step of the same layout.",
        ["network", "backend", "layout", "ms/step", "[min, max]", "x torch BN", "x bnk BN"],
        [[r["network"], r["backend"], r["layout"], f"{r['median_ms']:.2f}",
          f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}]", f"{r['ratio_vs_torch']:.3f}",
          f"{r['ratio_vs_batchnorm']:.3f}"] for r in sec.get("steps", [])])
    lines += table(
        "The CPU path, per op (cpu)",
        "Each normalization site of the network; fwd: training forward (autograd "
        "recording), fwd+bwd: forward and backward. Ratio: to torch.nn.BatchNorm2d.",
        ["shape", "layout", "op", "pass", "ms", "[min, max]", "x torch"],
        [["x".join(map(str, r["shape"])), r["layout"], r["op"], r["pass"],
          f"{r['median_ms']:.3f}", f"[{r['min_ms']:.3f}, {r['max_ms']:.3f}]",
          f"{r['ratio_vs_torch']:.2f}"] for r in sec.get("ops", [])])
    return lines


__all__ = ["CpuPathOptions", "LIMITS", "markdown", "run", "settings", "targets", "unavailable"]
