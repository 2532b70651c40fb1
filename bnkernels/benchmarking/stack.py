"""The Python stack above the launches, measured on any device (``stack`` rows of the
``overhead`` section; ``bnkernels bench --device cpu`` runs them too).

bnkernels' calls with every Triton launch replaced by a no-op of the same signature
(:class:`bnkernels.backends.triton.launch.stub_launches`): what is left is the host path
above the kernels -- the signature and plan lookup, the autograd Function, allocations, the
module's bookkeeping and the launch call itself. It is compared with torch's own path for the
same call, kernels included (torch's are C++ calls on a tiny tensor): ``bnk.batch_norm`` with
``F.batch_norm``, ``bnk.BatchNorm2d`` with ``torch.nn.BatchNorm2d``, and noisy BatchNorm and
l_p (functional and module) with the same torch BatchNorm. Goals (issue #17): modules at most
1.0x torch's module, functionals at most 1.2x ``F.batch_norm``, forward and forward+backward.

Each row is also measured with every launch *emulated* (:class:`~bnkernels.backends.triton.
launch.emulate_launches`): the direct launch path itself, its guards (current device, pointer
alignment, integer types, launch hooks), the addresses and the call of the launcher's C entry,
only that C entry a no-op -- what a warm launch costs in Python on a GPU machine
(``us_per_call_emulated``, ``ratio_emulated``). ``us_per_launch``: one warm direct launch of
the row's first kernel, timed alone (called with keywords, as its plan calls it);
``launches``: launches per call.

On the CPU it is a proxy, not a GPU claim: a GPU launch itself costs a few microseconds more
(the direct launcher) and torch's CUDA path costs more than its CPU kernel on a tiny tensor.

Timing: ``rounds`` rounds, each timing ``calls`` back-to-back calls of torch's and then of
bnkernels' callable (interleaved, so machine load hits both alike); per-call time = the
median over rounds, ratio = the median of the per-round ratios. The clock is this thread's CPU
time on the CPU (torch on one thread; other processes on the cores do not count) and the wall
time (synchronized) on a GPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PASSES = ("fwd", "fwd+bwd")
APIS = ("functional", "module")
OPS = ("batch_norm", "noisy_batch_norm", "lp_norm")
SHAPE = (2, 3, 4, 4)
LIMITS = {"functional": 1.2, "module": 1.0}  # the goals, x torch's same-API path


@dataclass(frozen=True)
class StackOptions:
    shape: tuple[int, ...] = SHAPE
    calls: int = 200  # calls per timed loop
    rounds: int = 15  # interleaved loops per side; medians reported
    warmup: int = 20

    @classmethod
    def for_run(cls, smoke: bool, quick: bool = False) -> StackOptions:
        """The bench's options: a few short loops in a smoke run (no claims), fewer rounds
        with --quick (about 10 s on a CPU), else the defaults (about 30 s)."""
        if smoke:
            return cls(calls=20, rounds=3, warmup=3)
        return cls(calls=100, rounds=7, warmup=10) if quick else cls()


def unavailable(device: torch.device) -> str | None:
    """Why the stack rows cannot be measured here (they need the Triton backend), or None."""
    import bnkernels as bnk

    reasons = bnk.available_backends()["triton"]
    return "; ".join(reasons) if reasons else None


def _torch_call(api: str, pass_: str, x, w, b, rm, rv, dy) -> Callable[[], object]:
    if api == "module":
        m = torch.nn.BatchNorm2d(x.shape[1]).to(x.device)
        if pass_ == "fwd":
            return lambda: m(x)
        params = (x, m.weight, m.bias)
        return lambda: torch.autograd.grad(m(x), params, dy)
    if pass_ == "fwd":
        return lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    leaves = (x, w, b)
    return lambda: torch.autograd.grad(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), leaves,
                                       dy)


def _ours_call(api: str, op: str, pass_: str, x, w, b, rm, rv, dy) -> Callable[[], object]:
    import bnkernels as bnk

    C = x.shape[1]
    if api == "module":
        m = {"batch_norm": lambda: bnk.BatchNorm2d(C),
             "noisy_batch_norm": lambda: bnk.NoisyBatchNorm2d(C),
             "lp_norm": lambda: bnk.LpNorm2d(C, p=2)}[op]().to(x.device)
        if pass_ == "fwd":
            return lambda: m(x)
        params = (x, m.weight, m.bias)
        return lambda: torch.autograd.grad(m(x), params, dy)
    if op == "batch_norm":
        def f():
            return bnk.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    elif op == "noisy_batch_norm":
        step = torch.zeros((), dtype=torch.long, device=x.device)

        def f():
            return bnk.noisy_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, seed=1, step=step)
    else:
        def f():
            return bnk.lp_norm(x, 2, rm, rv, w, b, True, 0.1, 1e-5)
    if pass_ == "fwd":
        return f
    leaves = (x, w, b)
    return lambda: torch.autograd.grad(f(), leaves, dy)


def _loop_us(fn: Callable[[], object], calls: int, sync: Callable[[], None], clock) -> float:
    sync()
    t0 = clock()
    for _ in range(calls):
        fn()
    sync()
    return (clock() - t0) / calls * 1e6


def _call_site(run, args: dict) -> Callable[[], object]:
    """``run(name=value, ...)`` as a plan's call site makes it (keywords, values from
    globals), as a no-argument function."""
    env = {"_run": run, **{f"_v{i}": v for i, v in enumerate(args.values())}}
    keywords = ", ".join(f"{k}=_v{i}" for i, k in enumerate(args))
    exec(compile(f"def call():\n    _run({keywords})\n", "<stack call site>", "exec"), env)
    return env["call"]


def _first_launch(fn: Callable[[], object]):
    """(launches per call of ``fn``, its first Launch, that launch's arguments)."""
    from bnkernels.backends.triton import launch as L

    seen: list = []
    with L.stub_launches():
        fn()
        saved = {la: la.run for la in list(L._ALL)}
        for la, run in saved.items():
            def counted(_la=la, _run=run, **kw):
                seen.append((_la, kw))
                return _run(**kw)
            la.run = counted
        try:
            fn()
        finally:
            for la, run in saved.items():
                la.run = run
    first, kw = seen[0]
    return len(seen), first, kw


def measure(device: torch.device, opts: StackOptions = StackOptions(),
            log: Callable[[str], None] = print) -> list[dict]:
    """Every (api, op, pass) row: bnkernels' stack (Triton launches stubbed) and torch's
    path per call, side by side. Needs the Triton backend (on the CPU: the interpreter on)."""
    import bnkernels as bnk
    from bnkernels.backends.triton.launch import emulate_launches, stub_launches

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On the CPU: this thread's CPU time (other processes sharing the cores do not count),
    # torch on one thread (its tiny-tensor kernels run inline). On a GPU: wall time.
    clock = time.perf_counter if cuda else time.thread_time
    threads = torch.get_num_threads()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(opts.shape, generator=g).to(device).requires_grad_()
    C = opts.shape[1]
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    dy = torch.randn(opts.shape, generator=g).to(device)
    before = bnk.get_backend()
    rows = []
    bnk.set_backend("triton")
    if not cuda:
        torch.set_num_threads(1)
    try:
        for api in APIS:
            for pass_ in PASSES:
                theirs = _torch_call(api, pass_, x, w, b, rm, rv, dy)
                for op in OPS:
                    ours = _ours_call(api, op, pass_, x, w, b, rm, rv, dy)
                    ours()  # the first call makes the plan (a real launch: compiles on a GPU)
                    with stub_launches():
                        for _ in range(opts.warmup):
                            theirs()
                            ours()
                    n_launches, first, first_args = _first_launch(ours)
                    t_theirs, t_ours, t_emu, t_one = [], [], [], []
                    for _ in range(opts.rounds):
                        with stub_launches():
                            t_theirs.append(_loop_us(theirs, opts.calls, sync, clock))
                            t_ours.append(_loop_us(ours, opts.calls, sync, clock))
                        with emulate_launches():
                            ours()  # binds the (emulated) direct path
                            one = _call_site(first.run, first_args)
                            one()
                            t_emu.append(_loop_us(ours, opts.calls, sync, clock))
                            t_one.append(_loop_us(one, opts.calls * 5, sync, clock))
                    ratio = statistics.median(o / t for o, t in zip(t_ours, t_theirs))
                    ratio_emu = statistics.median(o / t for o, t in zip(t_emu, t_theirs))
                    row = {"api": api, "op": op, "pass": pass_, "shape": list(opts.shape),
                           "us_per_call": statistics.median(t_ours),
                           "torch_us_per_call": statistics.median(t_theirs),
                           "ratio_vs_torch": ratio, "limit": LIMITS[api],
                           "met": ratio <= LIMITS[api],
                           "us_per_call_emulated": statistics.median(t_emu),
                           "ratio_emulated": ratio_emu, "met_emulated": ratio_emu <= LIMITS[api],
                           "launches": n_launches,
                           "us_per_launch": statistics.median(t_one),
                           "us_per_launch_spread": [min(t_one), max(t_one)]}
                    rows.append(row)
                    log(f"stack: {api:<10} {op:<16} {pass_:<7} {row['us_per_call']:7.1f} us "
                        f"vs torch {row['torch_us_per_call']:7.1f} us = {ratio:.2f}x "
                        f"(goal <= {LIMITS[api]}); launches emulated "
                        f"{row['us_per_call_emulated']:7.1f} us = {ratio_emu:.2f}x, "
                        f"{n_launches} launches, {row['us_per_launch']:.2f} us per launch")
    finally:
        bnk.set_backend(before)
        torch.set_num_threads(threads)
    return rows


def settings(opts: StackOptions, device: torch.device) -> dict:
    clock = ("time.perf_counter, a synchronize around each loop" if device.type == "cuda"
             else "time.thread_time (this thread's CPU time), torch on 1 thread")
    return {"method": f"{opts.rounds} interleaved rounds of {opts.calls} calls per side after "
                      f"{opts.warmup} warm-up calls; medians; ratio = median of the per-round "
                      f"ratios ({clock})",
            "shape": list(opts.shape), "dtype": "fp32", "device": str(device),
            "bnkernels": "triton backend, every launch a no-op (stub_launches); emulated: the "
                         "direct launch path with its C entry a no-op (emulate_launches)",
            "torch": "F.batch_norm / torch.nn.BatchNorm2d, kernels included",
            "limits": dict(LIMITS)}


__all__ = ["APIS", "LIMITS", "OPS", "PASSES", "StackOptions", "measure", "settings",
           "unavailable"]
