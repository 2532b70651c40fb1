"""The ``overhead`` section: host time per call, what an eager training loop pays per
normalization call on a small tensor (32x64x8x8 fp32 on the GPU), where the kernels take a few
microseconds and the Python/dispatch path above them is what a user feels.

Each row is one (provider, op, pass): ``us_per_call`` is the median over ``repeats`` loops of
the wall time per call of ``calls`` back-to-back calls with one synchronize at the end of each
loop (:func:`.timing.host_time_per_call`), and ``ratio_vs_torch`` divides it by
``F.batch_norm``'s time for the same pass (the ``cudnn`` provider on a GPU, ``torch-native`` on
the CPU; for noisy BatchNorm and l_p too: they are compared with plain BatchNorm).

Passes, as in a training step (x, weight and bias require grad, autograd records):
``fwd`` is the training forward; ``fwd+bwd`` is the forward and ``torch.autograd.grad`` of x,
weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch._dynamo

from . import providers as P
from .timing import host_time_per_call

PASSES = ("fwd", "fwd+bwd")
GPU_SHAPE = (32, 64, 8, 8)
CPU_SHAPE = (2, 3, 4, 4)
LP_P = "2"  # the l_p rows use p = 2

# Providers per device, in table order. The F.batch_norm baseline always runs.
GPU_PROVIDERS = ("cudnn", "torch-native", "torch-compile", "bnkernels-auto", "bnkernels-triton",
                 "bnkernels-triton-jit", "bnkernels-cuda")
CPU_PROVIDERS = ("torch-native", "bnkernels-auto", "bnkernels-reference")
NOT_ON_CPU = {
    "torch-compile": "torch.compile is left out of the CPU overhead rows (~20 s per graph)",
    "bnkernels-triton": "on the CPU the Triton kernels run interpreted (~30 ms a launch): no "
                        "host path to measure ('bnkernels-auto' runs them once here)",
    "bnkernels-cuda": "the CUDA backend needs a CUDA device",
    "bnkernels-triton-jit": "the interpreter has no direct launch path to compare with",
    "cudnn": "cuDNN needs a CUDA device",
}


def provider(name: str) -> P.Provider:
    return {P.AUTO.name: P.AUTO, P.TRITON_JIT.name: P.TRITON_JIT}.get(name) or P.PROVIDERS[name]


def names() -> tuple[str, ...]:
    """Every provider name this section knows."""
    return tuple(dict.fromkeys(GPU_PROVIDERS + CPU_PROVIDERS))


def baseline(device: torch.device) -> str:
    """The provider that runs F.batch_norm as torch does by default on ``device``."""
    return "cudnn" if device.type == "cuda" else "torch-native"


@dataclass(frozen=True)
class OverheadOptions:
    """What the section runs. ``providers``: names (the baseline is added if missing)."""

    shape: tuple[int, ...]
    calls: int  # calls per timed loop (one synchronize at its end)
    repeats: int  # timed loops; the median is reported
    warmup: int  # untimed calls first (the first compiles)
    providers: tuple[str, ...]

    @classmethod
    def for_device(cls, device: torch.device, smoke: bool = False,
                   requested: tuple[str, ...] = ()) -> OverheadOptions:
        cuda = device.type == "cuda"
        default = GPU_PROVIDERS if cuda else CPU_PROVIDERS
        chosen = tuple(n for n in default if not requested or n in requested
                       or n == baseline(device))
        if smoke and cuda:  # the test suite's GPU run: no torch.compile (seconds per graph)
            chosen = tuple(n for n in chosen if not provider(n).compiled)
        if cuda and not smoke:
            return cls(GPU_SHAPE, calls=400, repeats=9, warmup=20, providers=chosen)
        if cuda:  # smoke: checks the machinery, no claims
            return cls(GPU_SHAPE, calls=20, repeats=2, warmup=3, providers=chosen)
        return cls(CPU_SHAPE, calls=2, repeats=2, warmup=1, providers=chosen)

    def left_out(self, device: torch.device) -> list[dict]:
        """Default providers of the other device or of the full run that this one leaves out,
        with the reason (for the result's skip list)."""
        if device.type == "cuda":
            return [{"section": "overhead", "provider": n, "reason": "not run in a smoke run"}
                    for n in GPU_PROVIDERS if n not in self.providers and provider(n).compiled]
        return [{"section": "overhead", "provider": n, "reason": NOT_ON_CPU[n]}
                for n in GPU_PROVIDERS if n not in self.providers and n in NOT_ON_CPU]


def _ops(prov: P.Provider) -> list[tuple[str, str | None]]:
    """(op, p) pairs timed for a provider: plain BatchNorm for all; noisy BatchNorm and l_2 for
    bnkernels (the torch providers compute plain BatchNorm for every op)."""
    if prov.kind != "bnkernels":
        return [("batch_norm", None)]
    return [("batch_norm", None), ("noisy_batch_norm", None), ("lp_norm", LP_P)]


def _call(pass_: str, f, inp: P.Inputs) -> Callable[[], object]:
    x = inp.x.detach().requires_grad_()
    rm, rv, w, b, dy = inp.running_mean, inp.running_var, inp.weight, inp.bias, inp.dy
    if pass_ == "fwd":
        return lambda: f(x, rm, rv, w, b, True)
    leaves = (x, w, b)
    return lambda: torch.autograd.grad(f(x, rm, rv, w, b, True), leaves, dy)


def run(device: torch.device, opts: OverheadOptions, skipped: list[dict],
        log: Callable[[str], None] = print, compile_mode: str | None = None) -> list[dict]:
    """Time every provider, op and pass; returns the rows (failures go to ``skipped``)."""
    inp = P.make_inputs(opts.shape, torch.float32, torch.contiguous_format, device)
    base = baseline(device)
    names_ = opts.providers if base in opts.providers else (base, *opts.providers)
    rows: list[dict] = []
    for name in names_:
        prov = provider(name)
        why = prov.unavailable(device)
        if why:
            skipped.append({"section": "overhead", "provider": name, "reason": why})
            log(f"overhead: skip {name}: {why}")
            continue
        if prov.compiled:
            torch._dynamo.reset()  # a fresh compile: one graph per pass
        for op, p in _ops(prov):
            why = prov.unavailable(device, op)
            if why:
                skipped.append({"section": "overhead", "provider": name, "op": op,
                                "reason": why})
                continue
            f = prov.forward(op, p, compile_mode)  # one torch.compile for both passes
            for pass_ in PASSES:
                try:
                    with prov.context():
                        m = host_time_per_call(_call(pass_, f, inp), device, opts.calls,
                                               opts.repeats, opts.warmup)
                except Exception as e:  # recorded with the reason; the run goes on
                    reason = P.first_line(e)
                    skipped.append({"section": "overhead", "provider": name, "op": op,
                                    "pass": pass_, "reason": reason})
                    log(f"overhead: {name} {op} {pass_} failed: {reason}")
                    continue
                row = {"op": op, "p": p, "pass": pass_, "provider": name,
                       "backend": prov.backend, "shape": list(opts.shape), "dtype": "fp32",
                       "layout": "NCHW", "calls": opts.calls, "repeats": opts.repeats,
                       "us_per_call": m.median_us, "min_us_per_call": m.min_us,
                       "max_us_per_call": m.max_us, "baseline": base, "ratio_vs_torch": None}
                rows.append(row)
    add_ratios(rows, base)
    for r in rows:
        ratio = "-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x"
        op = r["op"] + (f"[p={r['p']}]" if r["p"] else "")
        log(f"overhead: {r['provider']:<20} {op:<18} {r['pass']:<8} "
            f"{r['us_per_call']:>9.1f} us/call  {ratio} F.batch_norm")
    return rows


def add_ratios(rows: list[dict], base: str) -> None:
    """ratio_vs_torch = us_per_call / the baseline's (plain BatchNorm, same pass)."""
    ref = {r["pass"]: r["us_per_call"] for r in rows
           if r["provider"] == base and r["op"] == "batch_norm"}
    for r in rows:
        t = ref.get(r["pass"])
        r["ratio_vs_torch"] = None if t is None else r["us_per_call"] / t


def settings(opts: OverheadOptions, device: torch.device) -> dict:
    return {"method": f"wall time per call of {opts.calls} back-to-back calls, one synchronize "
                      f"at the end, median of {opts.repeats} loops after {opts.warmup} warm-up "
                      "calls (time.perf_counter)",
            "shape": list(opts.shape), "dtype": "fp32", "baseline": baseline(device),
            "passes": {"fwd": "training forward, x/weight/bias require grad (autograd records)",
                       "fwd+bwd": "forward + torch.autograd.grad of x, weight, bias"},
            "providers": list(opts.providers)}


__all__ = ["CPU_PROVIDERS", "GPU_PROVIDERS", "GPU_SHAPE", "OverheadOptions", "PASSES",
           "add_ratios", "baseline", "names", "provider", "run", "settings"]
