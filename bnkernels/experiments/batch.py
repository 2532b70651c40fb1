"""Many runs at once (:func:`run_many`): CPU and GPU worker processes, each run with a fixed
number of torch threads and the portable floating-point environment, stopped cleanly by a
signal."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch

import bnkernels as bnk

from . import stopping
from .config import RunConfig, pick_device
from .train import train

# ----------------------------------------------------------------------------- many runs

RUN_THREADS = 1
"""torch threads per run in :func:`run_many`: fixed, so a run's numbers do not depend on how
many cores the machine has (intra-op reductions split by thread count round differently);
runs are parallel across processes instead."""

PORTABLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Environment of :func:`run_many`'s CPU worker processes on x86-64: torch's vectorized
kernels, oneDNN's convolutions and MKL's BLAS all held to AVX2 code paths, which every recent
x86-64 CPU runs, so that two machines (AVX2 or AVX-512, Intel or AMD) take the same
floating-point paths (best effort: the libraries do not promise bit-identical results across
CPU models). Variables already set by the user are kept."""


@contextlib.contextmanager
def _worker_env(env: dict[str, str]):
    """Set ``env`` (where not set already) in this process while worker processes are
    started; this process's own libraries read it only at their import, long before."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def place(cfg: RunConfig, device: str = "auto", dln_device: str = "cpu") -> str:
    """The device a run of a batch trains on. The deep linear network (25 layers of 10x10 on
    1000 samples) is pure per-call overhead on a GPU, so it goes to ``dln_device`` (the CPU
    unless told otherwise; "same" follows ``device``); VGG goes to ``device`` ("auto": the
    GPU when there is one)."""
    if cfg.model == "dln" and dln_device != "same":
        return str(pick_device(dln_device))
    return str(pick_device(device))


def default_jobs(device: str = "auto") -> int:
    """CPU processes training at once: one per core (each run takes :data:`RUN_THREADS`
    threads)."""
    del device  # GPU runs get their own workers (see run_many)
    return max(1, os.cpu_count() or 1)


def default_gpu_jobs() -> int:
    """Processes sharing each GPU: small runs leave a GPU idle between one process's kernel
    launches, so a few processes per device keep it busy."""
    return 4 * max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


STOP_SECONDS = 30.0
"""How long :func:`run_many` waits for its workers to stop after a signal or a failed run
(each stops within a step and cuts its run folder back to its last checkpoint) before it
kills the ones left."""


def _run_worker(cfg_dict: dict, run_dir: str, device: str, threads: int,
                backend: str = "auto") -> tuple[str, float]:
    torch.set_num_threads(threads)
    bnk.set_backend(backend)  # the caller's choice, as if the run trained in its process
    t0 = time.time()
    try:
        with stopping.armed():  # a signal stops this run (its folder back to a checkpoint)
            train(RunConfig.from_dict(cfg_dict), run_dir, resume=True, device=device,
                  progress=False)
    except stopping.Interrupted as e:
        if not stopping.parent_alive():
            os._exit(e.exit_code)  # nobody is waiting for the result
        raise
    return run_dir, time.time() - t0


def _stop_workers(pools, futures) -> None:
    """Stop every worker process of ``pools`` (concurrent.futures process pools): runs not
    started are cancelled; running ones get SIGTERM, stop within a step, cut their folders
    back to their last checkpoints, report and exit. A run that has not reported after
    :data:`STOP_SECONDS` is killed where it is (its folder is then cut back by the next
    resume). Returns when no worker is left."""
    import concurrent.futures as cf
    import signal

    for f in futures:
        f.cancel()
    # the pool's worker processes (concurrent.futures keeps them in ``_processes``, pid ->
    # multiprocessing.Process, in every CPython 3.x; it has no public way to signal them)
    procs = [p for pool in pools for p in dict(getattr(pool, "_processes", None) or {}).values()]
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p.pid, signal.SIGTERM)
    cf.wait([f for f in futures if not f.done()], timeout=STOP_SECONDS)
    deadline = time.monotonic() + 5.0  # the workers exit at once (stopping._exit_now...)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    for pool in pools:
        pool.shutdown(wait=True)


def run_many(jobs_list: list[tuple[RunConfig, Path]], jobs: int | None = None,
             device: str = "auto", progress: bool = True, *, gpu_jobs: int | None = None,
             dln_device: str = "cpu", threads: int = RUN_THREADS) -> dict[str, float]:
    """Train (or resume, or skip when finished) every (config, run folder) pair and return the
    seconds each run took in this call.

    Each run is placed by :func:`place` (the DLN on the CPU, VGG on the GPU when there is
    one). CPU runs go to ``jobs`` processes (default: one per core, minus the GPU workers),
    GPU runs to ``gpu_jobs`` processes sharing the device(s) (default 4 per GPU); both pools
    work at the same time, each run with ``threads`` torch threads. Every run trains in a
    worker process, even with ``jobs=1``: the floating-point environment of
    :data:`PORTABLE_CPU_ENV` is read by torch, oneDNN and MKL when they load, so only a fresh
    process gets it, and a run's numbers are then the same whatever ``jobs`` is (a suite
    stopped under one ``jobs`` and resumed under another matches an uninterrupted one).

    SIGINT (one Ctrl-C) or SIGTERM stops every run within a step or so, each folder cut back
    to its last checkpoint, and raises :class:`~.stopping.Interrupted` once no worker is left;
    so does a run that fails (its error is raised). Called again, the runs resume."""
    from tqdm.auto import tqdm

    placed = [(cfg, Path(run_dir), place(cfg, device, dln_device))
              for cfg, run_dir in jobs_list]
    on_gpu = [j for j in placed if j[2] != "cpu"]
    on_cpu = [j for j in placed if j[2] == "cpu"]
    n_gpu = min(len(on_gpu), gpu_jobs or default_gpu_jobs()) if on_gpu else 0
    n_cpu = min(len(on_cpu), jobs or max(1, default_jobs() - n_gpu)) if on_cpu else 0
    seconds: dict[str, float] = {}
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    backend = bnk.get_backend()
    portable = PORTABLE_CPU_ENV if platform.machine().lower() in ("x86_64", "amd64") else {}
    pools: list = []
    futures: list = []
    # Workers are spawned as tasks arrive and inherit the environment then; the GPU workers
    # get it too (their CPU work is small).
    with contextlib.ExitStack() as stack:
        stack.enter_context(stopping.stop_on_signals())
        stack.enter_context(_worker_env(portable if n_cpu else {}))
        bar = stack.enter_context(tqdm(total=len(placed), desc="runs", disable=not progress))
        try:
            by_kind = {kind: cf.ProcessPoolExecutor(
                           max_workers=n, mp_context=ctx, initializer=stopping.init_worker,
                           initargs=(os.getpid(),))
                       for kind, n in (("cpu", n_cpu), ("gpu", n_gpu)) if n}
            pools.extend(by_kind.values())
            for cfg, run_dir, dev in placed:
                futures.append(by_kind["gpu" if dev != "cpu" else "cpu"].submit(
                    _run_worker, cfg.to_dict(), str(run_dir), dev, threads, backend))
            pending = set(futures)
            while pending:
                # wake up now and then: a signal that landed on another thread runs its
                # handler only when this one executes Python code
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    run_dir, secs = fut.result()
                    seconds[run_dir] = secs
                    bar.set_postfix_str(f"{Path(run_dir).name} {secs:.0f}s", refresh=False)
                    bar.update(1)
        except BaseException:
            _stop_workers(pools, futures)
            raise
        for pool in pools:
            pool.shutdown(wait=True)
    return seconds
