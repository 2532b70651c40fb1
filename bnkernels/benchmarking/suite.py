"""The suite runner. A run has up to three sections (``RunOptions.sections``), in this order:

* ``overhead`` (:mod:`.overhead`): host time per call on a small tensor, every provider;
* ``e2e`` (:mod:`.e2e`): VGG-16 and ResNet-50 training steps, torch's BatchNorm vs bnkernels';
* ``cpu`` (:mod:`.cpu_path`, CPU runs only): the cpu backend at the main job's shapes, per op
  and per training step, beside torch's BatchNorm, with its targets;
* ``kernels``: every (op, pass, provider, shape, dtype, layout) in each timing mode ("eager":
  CUDA events around eager calls; "graph": CUDA-graph replays, kernel time without launch
  overhead), with bandwidths, speedups, and the project's kernel goals.

and ends with the ``targets`` (:mod:`.targets`): each target with its measured value, limit and
whether it was met. The copy-bandwidth baseline is measured once, eagerly, before everything.

A kernel row's numbers (see :func:`run`):

* ``median_us``: median time of one pass (:mod:`.timing`).
* ``bytes`` / ``bytes_ideal``: the compulsory traffic of the pass (``TRAFFIC``, multiples of the
  bytes of x); ``gbps`` = bytes / median time (1e9 bytes/s), ``gbps_ideal`` likewise.
* ``frac_copy_bw`` = gbps / the device-to-device copy bandwidth measured in the same run.
* ``speedup_vs_cudnn`` = t(cudnn) / t(row) for the same op, p, pass, shape, dtype and layout
  (null where cudnn did not run); ``speedup_vs_compile`` against ``COMPILE_BASELINE[op]``;
  ``speedup_vs_eager`` against the eager composite (noisy BN, l_p); ``speedup_vs_best`` against
  the fastest provider of that key (1.0: this row is the fastest).
* ``max_err``: the forward output's max error against an fp64 oracle, relative to
  max(1, max|y|) (forward rows of batch_norm and lp_norm), and ``check`` "ok" / "FAIL".
* ``mode``: "eager" or "graph"; rows compare (speedups, goals) only within one mode, and the
  goals are judged on the graph rows where there are any (kernel time), else the eager ones.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import cpu_path as CPU
from . import e2e as E2E
from . import overhead as OVH
from . import stack as STACK
from . import targets as TGT
from .providers import (
    BNKERNELS,
    CHECK_TOL,
    COMPILE_BASELINE,
    OPS,
    PASSES,
    PROVIDERS,
    TRAFFIC,
    first_line,
    make_inputs,
    max_error,
    oracle,
    pass_builder,
)
from .shapes import DTYPES, Shape, combo_order, layout_name, memory_format
from .timing import COPY_REPS, COPY_WARMUP, Timer, copy_bandwidth, copy_method

SCHEMA_VERSION = 2  # 2: sections overhead/e2e, targets, a "mode" per kernel row
SECTIONS = ("overhead", "e2e", "cpu", "kernels")  # in the order they run
MODES = ("eager", "graph")  # kernel timing: eager calls / CUDA-graph replays
LARGE_BYTES = 2**28  # "large tensor" for the bandwidth goals: x of 256 MiB or more

# The goals of the benchmark issue, judged in :func:`summarize` (measured, never asserted).
GOALS = {
    "bn_train_vs_cudnn": 1.3,     # geomean speedup, batch_norm fwd+bwd, bnkernels vs cuDNN
    "bn_train_vs_compile": 1.15,  # the same against torch.compile
    "bn_min_vs_best": 0.95,       # every batch_norm key: bnkernels >= 0.95x the best provider
    "large_fwd_frac_copy": 0.90,  # large tensors, fwd-train (3B model): fraction of copy BW
    "large_bwd_frac_copy": 0.85,  # large tensors, bwd (5B model)
    "noisy_over_plain": 1.05,     # geomean t(noisy BN) / t(BN), bnkernels, training passes
    "lp_vs_eager": 3.0,           # geomean speedup of bnkernels l_p over its eager composite
}


@dataclass
class RunOptions:
    """What to run. Lists hold names (see shapes.py and providers.py)."""

    device: torch.device
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    ops: tuple[str, ...] = OPS
    passes: tuple[str, ...] = PASSES
    providers: tuple[str, ...] = ()
    requested: tuple[str, ...] = ()  # providers named on the command line
    lp_ps: tuple[str, ...] = ("2",)
    reps: int = 100
    warmup: int = 10
    flush: bool = True
    modes: tuple[str, ...] = ("eager",)  # kernel timing modes (MODES)
    compile_mode: str | None = None
    copy_bytes: int = 2**30
    copy_reps: int = COPY_REPS
    copy_warmup: int = COPY_WARMUP
    check: bool = True
    # The whole run's time limit: no new e2e configuration or kernel input starts after it;
    # e2e stops kernel_reserve_s earlier so the kernels get some time. None: no limit.
    time_limit_s: float | None = None
    kernel_reserve_s: float = 60.0
    suite: str = "custom"
    sections: tuple[str, ...] = SECTIONS
    smoke: bool = False  # tiny sizes everywhere (the tests' run): no performance claims
    overhead: OVH.OverheadOptions | None = None  # None: the device's defaults
    stack: STACK.StackOptions | None = None  # None: the defaults (smoke: a few short loops)
    e2e: E2E.E2EOptions | None = None
    cpu: CPU.CpuPathOptions | None = None  # None: the full section (CPU runs only)
    log: Callable[[str], None] = field(default=print)
    # Called with the result document so far after each section (the bench command writes it
    # to a partial file, so a run killed later keeps the finished sections).
    checkpoint: Callable[[dict], None] | None = None

    @property
    def claims(self) -> bool:
        """Whether the times say anything about performance: a full-size GPU run."""
        return self.device.type == "cuda" and not self.smoke


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "triton": triton_version, "cudnn": cudnn,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_compiler() -> None:
    """Fresh torch.compile caches for each input: one compiled graph per input and grad mode,
    never a silent fall-back to eager when the recompile limit is hit."""
    import torch._dynamo

    torch._dynamo.reset()


def _cudnn_dispatch(inp) -> str | None:
    """What F.batch_norm runs for this input with cuDNN enabled (it may fall back to the
    native kernels for some shapes and dtypes)."""
    select = getattr(torch._C, "_select_batch_norm_backend", None)
    if select is None or inp.x.device.type != "cuda":
        return None
    try:
        with torch.backends.cudnn.flags(enabled=True):
            chosen = select(inp.x, inp.weight, inp.bias, inp.running_mean, inp.running_var,
                            True, 1e-5)
    except (RuntimeError, TypeError):  # a private helper: its signature may change
        return None
    return str(chosen).rsplit(".", 1)[-1]


def run(opts: RunOptions) -> dict:
    """Run the suite; returns the result document (see ``write`` in :mod:`.report`).

    On the CPU, torch runs on one intra-op thread for the run (tiny tensors on several threads
    time thread wake-ups, tens of milliseconds per op on some machines)."""
    threads = torch.get_num_threads()
    if opts.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts: RunOptions) -> dict:
    device = opts.device
    log = opts.log
    unknown = [m for m in opts.modes if m not in MODES]
    if unknown or not opts.modes:
        raise ValueError(f"unknown timing modes {unknown}; choose from {MODES}")
    start = time.monotonic()
    deadline = None if opts.time_limit_s is None else start + opts.time_limit_s
    # The baseline first, the same way whatever the modes: an eager copy (see timing.py).
    copy_bw = copy_bandwidth(device, opts.copy_bytes, reps=opts.copy_reps,
                             warmup=opts.copy_warmup, flush=opts.flush)
    log(f"device: {device_name(device)}; copy bandwidth {copy_bw:.1f} GB/s "
        f"({opts.copy_bytes / 2**20:.0f} MiB copied eagerly)")
    truncated: list[str] = []
    doc = {
        "schema_version": SCHEMA_VERSION,
        "device": device_name(device),
        "device_type": device.type,
        "performance_claims": opts.claims,
        **_versions(),
        "bnkernels_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "suite": opts.suite,
        "sections": [s for s in SECTIONS if s in opts.sections],
        "sections_done": [],
        "truncated": None,
        "copy_bw_gbps": copy_bw,
        "copy_bytes": opts.copy_bytes,
        "copy_bw_method": copy_method(device, opts.copy_reps, opts.copy_warmup, opts.flush),
        "timing": {"method": "", "modes": [], "reps": opts.reps, "warmup": opts.warmup,
                   "flush_bytes": 0, "cuda_graph": False,
                   "compile_mode": opts.compile_mode or "default"},
        "cudnn_settings": {"cudnn provider": "enabled=True benchmark=False "
                                             "deterministic=False",
                           "torch-native": "enabled=False",
                           "others": "enabled=True benchmark=False deterministic=False",
                           "e2e": "benchmark=True (every provider)"},
        "traffic_model": {k: {"bytes": f"{v[0]}B", "ideal": f"{v[1]}B"}
                          for k, v in TRAFFIC.items()},
        "providers": {},
        "shapes": {},
        "skipped": [],
        "rows": [],
        "overhead": [],
        "stack": [],
        "e2e": [],
        "cpu": {},
    }
    skipped = doc["skipped"]

    def section_done(name: str) -> None:
        doc["sections_done"].append(name)
        doc["truncated"] = "; ".join(truncated) or None
        doc["elapsed_s"] = round(time.monotonic() - start, 1)
        _release(device)
        if opts.checkpoint is not None:
            opts.checkpoint(_finish(dict(doc), opts.claims))

    if "overhead" in opts.sections:
        o = opts.overhead or OVH.OverheadOptions.for_device(device, opts.smoke,
                                                            opts.requested)
        skipped += o.left_out(device)
        doc["overhead_timing"] = OVH.settings(o, device)
        doc["overhead"] = OVH.run(device, o, skipped, log, opts.compile_mode)
        why = STACK.unavailable(device)
        if why:
            skipped.append({"section": "overhead", "provider": "stack", "reason": why})
        else:
            so = opts.stack or STACK.StackOptions.for_run(opts.smoke)
            doc["stack_timing"] = STACK.settings(so, device)
            doc["stack"] = STACK.measure(device, so, log)
        section_done("overhead")

    if "e2e" in opts.sections:
        e = opts.e2e or E2E.E2EOptions.for_device(device, quick=True, smoke=opts.smoke,
                                                  requested=opts.requested)
        skipped += e.left_out(device)
        e2e_deadline = deadline
        if deadline is not None and "kernels" in opts.sections:
            e2e_deadline = deadline - opts.kernel_reserve_s
        doc["e2e_timing"] = E2E.settings(e, device)
        doc["e2e"], cut = E2E.run(device, e, skipped, log, e2e_deadline)
        if cut:
            truncated.append(f"e2e: {cut}")
        section_done("e2e")

    if "cpu" in opts.sections:
        why = CPU.unavailable(device)
        if why:
            skipped.append({"section": "cpu", "provider": "bnkernels-cpu", "reason": why})
        else:
            c = opts.cpu or CPU.CpuPathOptions()
            doc["cpu_timing"] = CPU.settings(c)
            doc["cpu"] = CPU.run(device, c, log)
        section_done("cpu")

    if "kernels" in opts.sections:
        timers = {m: Timer(device, reps=opts.reps, warmup=opts.warmup, flush=opts.flush,
                           cuda_graph=m == "graph") for m in opts.modes}
        for m, t in timers.items():
            log(f"kernels, {m} mode: {t.method}")
        providers = []
        for name in opts.providers:
            why = PROVIDERS[name].unavailable(device)
            if why:
                skipped.append({"provider": name, "reason": why})
                log(f"skip {name}: {why}")
            else:
                providers.append(PROVIDERS[name])
        doc["timing"].update({
            "method": " | ".join(f"{m}: {t.method}" for m, t in timers.items()),
            "modes": list(timers), "flush_bytes": next(iter(timers.values())).flush_bytes,
            "cuda_graph": "graph" in timers})
        doc["providers"] = {p.name: p.description for p in providers}
        doc["shapes"] = {s.name: list(s.sources) for s in opts.shapes}
        configs = [(shape, dtype, layout_name(shape.dims, layout), layout)
                   for dtype, layout in combo_order(opts.dtypes, opts.layouts)
                   for shape in opts.shapes if layout_name(shape.dims, layout) is not None]
        runner = _Runner(opts, timers, providers, copy_bw, skipped)
        doc["rows"] = runner.rows
        for done, (shape, dtype, label, layout) in enumerate(configs):
            if deadline is not None and time.monotonic() > deadline:
                cut = (f"time limit of {opts.time_limit_s:g} s reached: {done} of "
                       f"{len(configs)} inputs measured")
                truncated.append(f"kernels: {cut}")
                log(f"stopping: {cut}")
                break
            runner.run_input(shape, dtype, label, layout)
        if "noisy_batch_norm" in opts.ops and "fwd-eval" in opts.passes:
            skipped.append({"op": "noisy_batch_norm", "pass": "fwd-eval",
                            "reason": "noisy BatchNorm in eval mode has no noise: it is "
                                      "batch_norm fwd-eval"})
        add_speedups(doc["rows"])
        section_done("kernels")
    doc["truncated"] = "; ".join(truncated) or None
    doc["elapsed_s"] = round(time.monotonic() - start, 1)
    return _finish(doc, opts.claims)


def _finish(doc: dict, claims: bool) -> dict:
    """The kernel goals and the targets of a (possibly partial) result document."""
    doc["summary"] = summarize(doc["rows"], claims)
    doc["targets"] = TGT.evaluate(doc)
    return doc


class _Runner:
    """Measures every (op, p, provider, pass) on one input at a time, reusing measurements of
    the plain-BatchNorm baselines across ops (they compute the same thing)."""

    def __init__(self, opts: RunOptions, timers: dict[str, Timer], providers: list,
                 copy_bw: float, skipped: list[dict]):
        self.opts, self.timers, self.providers, self.copy_bw = opts, timers, providers, copy_bw
        self.skipped = skipped
        self.rows: list[dict] = []
        self.measured: dict[tuple, dict] = {}
        self._op_skips: set = set()

    def run_input(self, shape: Shape, dtype: str, label: str, layout: str) -> None:
        opts, device, log = self.opts, self.opts.device, self.opts.log
        _release(device)
        if any(p.compiled for p in self.providers):
            _reset_compiler()
        try:
            inp = make_inputs(shape.dims, DTYPES[dtype], memory_format(layout), device)
        except torch.OutOfMemoryError as e:
            self.skipped.append({"shape_name": shape.name, "dtype": dtype, "layout": label,
                                 "reason": first_line(e)})
            log(f"skip {shape.name} {dtype} {label}: {first_line(e)}")
            return
        where = dict(shape=list(shape.dims), shape_name=shape.name, dtype=dtype, layout=label)
        note = None
        if any(p.name == "cudnn" for p in self.providers):
            chosen = _cudnn_dispatch(inp)
            if chosen and chosen != "Cudnn":
                note = f"F.batch_norm dispatches to {chosen}, not cuDNN, for this input"
        for mode in self.timers:
            for op in opts.ops:
                for p in (opts.lp_ps if op == "lp_norm" else (None,)):
                    expected: dict = {}  # oracle outputs of this input, op and p
                    for prov in self.providers:
                        if op in prov.ops and self._available(prov, op):
                            for pass_ in opts.passes:
                                if op == "noisy_batch_norm" and pass_ == "fwd-eval":
                                    continue  # recorded once in the skip list
                                self._one(prov, op, p, pass_, mode, inp, shape, where,
                                          expected, note)
        del inp
        _release(device)

    def _available(self, prov, op) -> bool:
        why = prov.unavailable(self.opts.device, op)
        if why and (prov.name, op) not in self._op_skips:
            self._op_skips.add((prov.name, op))
            self.skipped.append({"provider": prov.name, "op": op, "reason": why})
            self.opts.log(f"skip {prov.name} {op}: {why}")
        return not why

    def _one(self, prov, op, p, pass_, mode, inp, shape, where, expected, note) -> None:
        computes = prov.computes(op)
        key = (prov.name, computes, p if computes == "lp_norm" else None, pass_, mode,
               shape.dims, where["dtype"], where["layout"])
        if key not in self.measured:
            self.measured[key] = _measure(prov, op, p, pass_, inp, self.timers[mode],
                                          self.opts, expected)
        result = self.measured[key]
        ident = dict(op=op, p=p, **{"pass": pass_}, provider=prov.name, mode=mode, **where)
        if "error" in result:
            self.skipped.append({**ident, "reason": result["error"]})
            self.opts.log(_fmt_skip(ident, result["error"]))
            return
        row = _row(ident, result, shape, inp.x.element_size(), self.copy_bw)
        if prov.name == "cudnn" and note:
            row["note"] = note
        self.rows.append(row)
        self.opts.log(_fmt_row(row))


def _measure(prov, op, p, pass_, inp, timer: Timer, opts: RunOptions, expected: dict) -> dict:
    """Time one provider on one pass; {"error": reason} if it cannot run."""
    try:
        with prov.context():
            f = prov.forward(op, p, opts.compile_mode)
            m = timer.measure(pass_builder(pass_, f, inp))
            err = None
            if opts.check and pass_ in ("fwd-train", "fwd-eval"):
                computes = prov.computes(op)
                training = pass_ == "fwd-train"
                if (computes, training) not in expected:
                    expected[(computes, training)] = oracle(computes, p, inp, training)
                ref = expected[(computes, training)]
                if ref is not None:
                    err = max_error(f, inp, training, ref)
    except Exception as e:  # a provider that fails is recorded as skipped, with the reason
        if isinstance(e, torch.OutOfMemoryError):
            _release(inp.x.device)
        return {"error": first_line(e)}
    check = None
    if err is not None:
        check = "ok" if err <= CHECK_TOL[inp.x.dtype] else "FAIL"
    return {"median_us": m.median_us, "min_us": m.min_us, "max_us": m.max_us, "reps": m.reps,
            "max_err": err, "check": check}


def _row(ident: dict, result: dict, shape: Shape, elem_size: int, copy_bw: float) -> dict:
    nbytes = shape.numel * elem_size
    model, ideal = TRAFFIC[ident["pass"]]
    t = result["median_us"]
    gbps = model * nbytes / (t * 1e3)
    return {**ident, "numel": shape.numel, "x_bytes": nbytes, "bytes": model * nbytes,
            "bytes_ideal": ideal * nbytes, "median_us": t, "min_us": result["min_us"],
            "max_us": result["max_us"], "reps": result["reps"], "gbps": gbps,
            "gbps_ideal": ideal * nbytes / (t * 1e3), "frac_copy_bw": gbps / copy_bw,
            "max_err": result["max_err"], "check": result["check"],
            "speedup_vs_cudnn": None, "speedup_vs_compile": None, "speedup_vs_eager": None,
            "speedup_vs_best": None, "note": None}


def row_key(row: dict) -> tuple:
    """The rows that compare: same op, p, pass, shape, dtype, layout and timing mode."""
    return (row["op"], row["p"], row["pass"], tuple(row["shape"]), row["dtype"], row["layout"],
            row.get("mode", "eager"))


def add_speedups(rows: list[dict]) -> None:
    """Fill the speedup columns: t(baseline) / t(row) within each key (None: no baseline)."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(row_key(r), {})[r["provider"]] = r["median_us"]
    for r in rows:
        times = groups[row_key(r)]
        t = r["median_us"]

        def vs(name, times=times, t=t):
            return times[name] / t if name in times else None
        r["speedup_vs_cudnn"] = vs("cudnn")
        r["speedup_vs_compile"] = vs(COMPILE_BASELINE[r["op"]])
        r["speedup_vs_eager"] = vs("eager") if r["op"] != "batch_norm" else None
        r["speedup_vs_best"] = min(times.values()) / t


# ----------------------------------------------------------------------------- goals


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _bnkernels_best(rows: list[dict]) -> dict[tuple, dict]:
    """Per key, the faster bnkernels row (triton or cuda): what "auto" would pick."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["provider"] in BNKERNELS:
            k = row_key(r)
            if k not in best or r["median_us"] < best[k]["median_us"]:
                best[k] = r
    return best


def _where(r: dict) -> str:
    p = f"[p={r['p']}]" if r.get("p") else ""
    return f"{r['op']}{p} {r['pass']} {r['shape_name']} {r['dtype']} {r['layout']}"


def _goal(name, test, target, value, n, higher_is_better=True, worst=None, per=None) -> dict:
    met = None
    if value is not None:
        met = value >= target if higher_is_better else value <= target
    return {"goal": name, "test": test, "target": target,
            "compare": ">=" if higher_is_better else "<=", "value": value, "n": n, "met": met,
            "worst": worst, "by_provider": per}


def summarize(rows: list[dict], claims: bool) -> dict:
    """Each goal of the issue with the measured value (``met`` is None where nothing was
    measured, and on the CPU, where times say nothing about the kernels). The goals are about
    kernels: they are judged on the graph-mode rows where there are any (CUDA-graph replays,
    no launch overhead), else on the eager rows; ``mode`` says which."""
    modes = {r.get("mode", "eager") for r in rows}
    mode = "graph" if "graph" in modes else "eager"
    rows = [r for r in rows if r.get("mode", "eager") == mode]
    best = _bnkernels_best(rows)
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault(row_key(r), {})[r["provider"]] = r
    goals = []

    def ratio_goal(name, test, target, op, passes, baseline, higher=True):
        vals, worst = [], None
        per: dict[str, list[float]] = {}
        for k, b in best.items():
            if k[0] != op or k[2] not in passes or baseline not in by_key[k]:
                continue
            v = by_key[k][baseline]["median_us"] / b["median_us"]
            vals.append(v)
            if worst is None or v < worst[0]:
                worst = (v, _where(b))
            for prov in BNKERNELS:
                if prov in by_key[k]:
                    per.setdefault(prov, []).append(
                        by_key[k][baseline]["median_us"] / by_key[k][prov]["median_us"])
        goals.append(_goal(name, test, target, _geomean(vals), len(vals), higher,
                           worst and {"value": worst[0], "where": worst[1]},
                           {p: _geomean(v) for p, v in per.items()}))

    ratio_goal("bn_train_vs_cudnn", "geomean over batch_norm fwd+bwd rows of t(cudnn) / "
               "t(bnkernels, faster backend)", GOALS["bn_train_vs_cudnn"], "batch_norm",
               ("fwd+bwd",), "cudnn")
    ratio_goal("bn_train_vs_compile", "geomean over batch_norm fwd+bwd rows of "
               "t(torch-compile) / t(bnkernels)", GOALS["bn_train_vs_compile"], "batch_norm",
               ("fwd+bwd",), "torch-compile")

    # Every batch_norm key: bnkernels against the fastest other provider.
    vals = []
    for k, b in best.items():
        others = [r["median_us"] for n, r in by_key[k].items()
                  if n not in BNKERNELS and n != "bnkernels-reference"]
        if k[0] == "batch_norm" and others:
            vals.append((min(others) / b["median_us"], _where(b)))
    worst = min(vals) if vals else None
    goals.append(_goal("bn_min_vs_best", "min over batch_norm rows (every pass) of t(fastest "
                       "non-bnkernels provider) / t(bnkernels)", GOALS["bn_min_vs_best"],
                       worst[0] if worst else None, len(vals),
                       worst=worst and {"value": worst[0], "where": worst[1]}))

    for name, pass_ in (("large_fwd_frac_copy", "fwd-train"), ("large_bwd_frac_copy", "bwd")):
        large = [b for k, b in best.items() if k[0] == "batch_norm" and k[2] == pass_
                 and b["x_bytes"] >= LARGE_BYTES]
        w = min(large, key=lambda r: r["frac_copy_bw"]) if large else None
        goals.append(_goal(name, f"min over batch_norm {pass_} rows with x >= "
                           f"{LARGE_BYTES // 2**20} MiB of frac_copy_bw ({TRAFFIC[pass_][0]}B "
                           "model), bnkernels", GOALS[name],
                           w["frac_copy_bw"] if w else None, len(large),
                           worst=w and {"value": w["frac_copy_bw"], "where": _where(w)}))

    # Noisy over plain: same key but op, both from bnkernels' faster backend.
    vals = []
    for k, b in best.items():
        if k[0] == "noisy_batch_norm":
            plain = best.get(("batch_norm",) + k[1:])
            if plain is not None:
                vals.append((b["median_us"] / plain["median_us"], _where(b)))
    worst = max(vals) if vals else None
    goals.append(_goal("noisy_over_plain", "geomean over noisy_batch_norm training rows of "
                       "t(noisy BN) / t(BN), bnkernels (worst: the largest)",
                       GOALS["noisy_over_plain"], _geomean([v for v, _ in vals]), len(vals),
                       higher_is_better=False,
                       worst=worst and {"value": worst[0], "where": worst[1]}))

    ratio_goal("lp_vs_eager", "geomean over lp_norm rows (every pass) of t(eager) / "
               "t(bnkernels)", GOALS["lp_vs_eager"], "lp_norm", PASSES, "eager")
    if not claims:
        for g in goals:
            g["met"] = None
    return {"performance_claims": claims, "mode": mode if rows else None, "goals": goals}


# ----------------------------------------------------------------------------- log lines


def _fmt_row(r: dict) -> str:
    err = f"  err {r['max_err']:.1e} {r['check']}" if r["max_err"] is not None else ""
    return (f"{_where(r):<58} {r['provider']:<20} {r.get('mode', 'eager'):<5} "
            f"{r['median_us']:>11.1f} us "
            f"{r['gbps']:>8.1f} GB/s {100 * r['frac_copy_bw']:>5.1f}% copy{err}")


def _fmt_skip(ident: dict, reason: str) -> str:
    return f"{_where(ident):<58} {ident['provider']:<20} skipped: {reason}"


__all__ = ["GOALS", "LARGE_BYTES", "MODES", "SCHEMA_VERSION", "SECTIONS", "RunOptions",
           "add_speedups", "device_name", "row_key", "run", "summarize"]
