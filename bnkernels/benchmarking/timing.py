"""Timing: CUDA events with the L2 flushed between repetitions (optionally CUDA-graph replays),
or ``time.perf_counter`` on the CPU (a smoke test: no performance claims), and the device-to-
device copy bandwidth that every result is measured against.

GPU protocol (as Triton's ``do_bench``): ``warmup`` untimed calls (compilation, autotuning,
allocator warm-up), then ``reps`` repetitions, each preceded by writing a buffer larger than
the L2 cache (256 MiB, or 4x the L2 if that is larger) so every repetition reads its inputs
from HBM; each repetition is bracketed by CUDA events on the current stream and the median is
reported. Without ``cuda_graph`` the time includes any host launch overhead that the flush does
not hide (small shapes); with it, the callable is captured once and replayed.

Two more clocks, for what users feel rather than what the kernels take:
:func:`host_time_per_call` (a loop of calls with one synchronize at its end: the wall time per
call of an eager loop, host overhead included) and :func:`step_times` (a training step timed
with a synchronize on each side).

The copy bandwidth (:func:`copy_bandwidth`) is measured the same way in every run, whatever the
mode of the rows: an eager ``copy_`` timed with CUDA events, never graph-captured. A memcpy
captured in a CUDA graph becomes a graph memcpy node, which the driver may run on the copy
engines rather than the SMs: on an H200 the captured copy measured 2757 GB/s against the eager
copy's 4236 GB/s, so rows divided by the captured baseline read above 100% of "copy" bandwidth.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Measurement:
    median_us: float
    min_us: float
    max_us: float
    reps: int


def _summary(times_us: list[float]) -> Measurement:
    return Measurement(statistics.median(times_us), min(times_us), max(times_us), len(times_us))


class Timer:
    """Times zero-argument callables on one device.

    Args:
        device: a CUDA device (events) or "cpu" (perf_counter).
        reps: timed repetitions (the median is reported).
        warmup: untimed calls before timing (the first compiles).
        flush: write a buffer larger than L2 before each repetition.
        cuda_graph: capture the callable in a CUDA graph and time its replays (CUDA only).
    """

    def __init__(self, device: torch.device, reps: int = 100, warmup: int = 10,
                 flush: bool = True, cuda_graph: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if cuda_graph and not self.cuda:
            raise ValueError("cuda_graph timing needs a CUDA device")
        if reps < 1 or warmup < 0:
            raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
        self.reps, self.warmup, self.flush, self.cuda_graph = reps, warmup, flush, cuda_graph
        self.flush_bytes = 0
        self._flush_buf = None
        if flush:
            self.flush_bytes = FLUSH_BYTES
            if self.cuda:
                l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0)
                self.flush_bytes = max(FLUSH_BYTES, 4 * int(l2 or 0))
            self._flush_buf = torch.empty(self.flush_bytes, dtype=torch.int8, device=self.device)

    @property
    def method(self) -> str:
        """How times were taken, for the result file."""
        if not self.cuda:
            how = (f"time.perf_counter on the CPU, {torch.get_num_threads()} intra-op "
                   "thread(s) (smoke test: no performance claims)")
        else:
            how = "CUDA events" + (", CUDA-graph replays" if self.cuda_graph else "")
        flush = f"{self.flush_bytes / 2**20:.0f} MiB buffer written" if self.flush else "no"
        return (f"{how}; median of {self.reps} repetitions after {self.warmup} warm-up calls; "
                f"cache flush between repetitions: {flush}")

    def flush_cache(self) -> None:
        """Evict the cache: write the flush buffer (no-op when flushing is off)."""
        if self._flush_buf is not None:
            self._flush_buf.zero_()

    def measure(self, build: Callable[[], Callable[[], object]]) -> Measurement:
        """Median time, in microseconds, of the callable that ``build()`` returns.

        ``build`` makes the callable (and runs whatever must precede it, e.g. the forward of a
        backward-only pass); in CUDA-graph mode it runs on the capture stream."""
        if not self.cuda:
            return self._measure_cpu(build())
        if self.cuda_graph:
            fn = capture_graph(build, self.warmup)
            for _ in range(self.warmup):
                fn()
        else:
            fn = build()
            for _ in range(self.warmup):
                fn()
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush_cache()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return _summary([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])

    def _measure_cpu(self, fn) -> Measurement:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush_cache()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return _summary(times)


def capture_graph(build: Callable[[], Callable[[], object]], warmup: int = 3
                  ) -> Callable[[], None]:
    """Build a callable, capture it in a CUDA graph and return the graph's replay.

    ``build()`` and the warm-up calls run on a side stream, which then captures (PyTorch's CUDA
    graph recipe): a backward-only callable's forward thus runs on the capture stream, where
    autograd will launch the backward ops."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        fn = build()
        for _ in range(max(1, warmup)):
            fn()
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
    stream.wait_stream(side)
    torch.cuda.synchronize()
    return graph.replay


COPY_REPS, COPY_WARMUP = 50, 5  # the copy baseline's repetitions on a GPU, in every run


def copy_method(device: torch.device, reps: int = COPY_REPS, warmup: int = COPY_WARMUP,
                flush: bool = True) -> str:
    """How :func:`copy_bandwidth` measures, for the result file."""
    clock = "CUDA events" if torch.device(device).type == "cuda" else "time.perf_counter"
    return (f"eager dst.copy_(src), never graph-captured; {clock}; median of {reps} "
            f"repetitions after {warmup} warm-up copies; cache flushed between repetitions: "
            f"{'yes' if flush else 'no'}")


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = COPY_REPS,
                   warmup: int = COPY_WARMUP, flush: bool = True) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s): ``dst.copy_(src)`` of ``nbytes``
    counts as 2 * nbytes moved (one read, one write).

    Always timed eagerly (its own :class:`Timer`, ``cuda_graph=False``), whatever the mode of
    the rows it is compared with: see the module docstring for why."""
    timer = Timer(device, reps=reps, warmup=warmup, flush=flush, cuda_graph=False)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=timer.device)
    dst = torch.empty_like(src)
    m = timer.measure(lambda: lambda: dst.copy_(src))
    return 2 * n * 4 / (m.median_us * 1e3)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_time_per_call(fn: Callable[[], object], device: torch.device, calls: int,
                       repeats: int, warmup: int = 1) -> Measurement:
    """Wall time per call, in microseconds, of ``calls`` back-to-back calls of ``fn`` with ONE
    synchronize at the end; the median over ``repeats`` such loops (after ``warmup`` untimed
    calls and a synchronize). The host issues calls while the device runs earlier ones, so this
    is what an eager loop costs: the host path when it is the bottleneck, the kernels when they
    are."""
    if calls < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need calls >= 1, repeats >= 1, warmup >= 0; got {calls}, {repeats}, "
                         f"{warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return _summary(per_call)


def step_times(step: Callable[[], object], device: torch.device, warmup: int, min_steps: int,
               min_seconds: float = 0.0, max_steps: int | None = None) -> list[float]:
    """Times, in milliseconds, of training steps each bracketed by synchronizes: ``warmup``
    untimed steps, then at least ``min_steps`` timed ones, more until ``min_seconds`` of timed
    steps have passed (at most ``max_steps``)."""
    if min_steps < 1 or warmup < 0:
        raise ValueError(f"need min_steps >= 1 and warmup >= 0, got {min_steps}, {warmup}")
    for _ in range(warmup):
        step()
    times: list[float] = []
    total = 0.0
    while len(times) < min_steps or (total < min_seconds and
                                     (max_steps is None or len(times) < max_steps)):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        dt = time.perf_counter() - t0
        total += dt
        times.append(dt * 1e3)
    return times


__all__ = ["COPY_REPS", "COPY_WARMUP", "FLUSH_BYTES", "Measurement", "Timer", "capture_graph",
           "copy_bandwidth", "copy_method", "host_time_per_call", "step_times", "synchronize"]
