"""Kernel quality without a GPU (``bnkernels bench --sass``): compile, for sm_90, the Triton
kernels each plan launches on the benchmark suite's inputs, with the specialization the JIT gives
them, and read back what the hardware will see.

Static analysis of code compiled on the CPU; no kernel runs. For every (op, pass, shape, dtype,
layout) of a suite:

1. **Launches** (:mod:`.launches`; :func:`~.launches.launches_of` is the one function that knows
   the plans): the real plan call runs on fake CUDA tensors as if on an H200 (132 SMs, the
   interpreter off), ``JITFunction.run`` recording each launch instead of launching.
2. **Specialization** (:func:`.compile.specialize`): Triton's own JIT specializes each launch for
   sm_90 (pointer and integer divisibility by 16, integers equal to 1, constexprs,
   ``do_not_specialize``, num_warps). Launches with the same kernel and specialization are
   compiled once.
3. **Compile and read back** (:func:`.compile.analyze`): registers and frame from the cubin,
   spills from ptxas's log, shared memory (static + dynamic), every global load/store decoded
   from the SASS by width, each attributed to the kernel argument it reads or writes (PTX source
   locations matched to the Triton IR's pointer data flow), and the occupancy that follows.
   Analyses are cached on disk by kernel source hash and specialization
   (``$BNKERNELS_SASS_CACHE``, default ``~/.cache/bnkernels/sass``).
4. **Requirements** (:func:`check`): no spills; tile accesses of the big tensors (x, y, dy, dx)
   as wide as alignment allows (:func:`allowed_bits`).
5. **Bytes moved** (:mod:`.bytes_model`): each launch sequence's DRAM traffic against the
   minimum, and the time either takes at the H200's copy bandwidth.

Report, files and command line: :mod:`.report`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import math
import multiprocessing
import os
import platform
import time

import torch

from .compile import H200, Device, analyze, cached, specialize
from .launches import OPS, PASSES, Case, LaunchSpec, case_launches, cases

LABEL = ("Static analysis of kernels compiled on the CPU for sm_90 (H200) with Triton's "
         "compiler and the JIT's specialization; no kernel was run on a GPU")


def _row(t: torch.Tensor) -> int:
    """The run of consecutive elements a kernel tiles as one row of an (N, C, *spatial)
    input: the values of one channel of one sample (S = H*W) when the spatial dims are
    innermost (NCHW), the C channels of one position when C is (channels last, (N, C))."""
    run = 1
    for stride, n, dim in sorted((s, n, d) for d, (s, n) in enumerate(zip(t.stride(), t.shape))
                                 if n > 1):
        if stride != run or (dim == 1 and run > 1):
            break
        run *= n
        if dim == 1:
            break
    return run


def allowed_bits(t: torch.Tensor) -> int:
    """The widest access (bits, at most 128) alignment allows on the rows of ``t`` (see
    :func:`_row`) in a kernel that tiles them: the largest power of two dividing both the row's
    bytes and the byte offset of ``t`` from a 256-byte aligned base. 128 bits (4 fp32 or 8
    fp16/bf16 values) when the row -- S = H*W in NCHW, C in channels last and (N, C) -- is a
    multiple of 16 bytes: S or C divisible by 4 in fp32, by 8 in fp16/bf16; 64 bits when it is
    a multiple of 8 bytes; and so on down to one element."""
    size = t.element_size()
    run_bytes = _row(t) * size
    offset = t.storage_offset() * size
    w = 16
    while w > size and (run_bytes % w or offset % w):
        w //= 2
    return 8 * w


def arg_table(launch: LaunchSpec, numel: int) -> dict:
    """The tensor arguments of a launch by parameter name: bytes, whether it is one of the big
    tensors (x's ``numel``), identity (the same tensor in two launches) and the widest access
    its alignment allows."""
    names = list(launch.kernel.arg_names)
    bound = list(zip(names, launch.args)) + [(k, v) for k, v in launch.kwargs.items()
                                             if k in names]
    out = {}
    for name, a in bound:
        if isinstance(a, torch.Tensor):
            out[name] = {"id": id(a), "numel": a.numel(), "bytes": a.numel() * a.element_size(),
                         "dtype": str(a.dtype).replace("torch.", ""), "big": a.numel() == numel,
                         "allowed_bits": allowed_bits(a)}
    return out


def check(kernel: dict, args: dict) -> list[str]:
    """What a compiled kernel launched with ``args`` (see :func:`arg_table`) falls short of:
    spills, or a tile access of a big tensor narrower than its alignment allows."""
    problems = []
    if kernel["spill_stores"] or kernel["spill_loads"]:
        problems.append(f"spills: {kernel['spill_stores']} B stored, "
                        f"{kernel['spill_loads']} B loaded")
    for name, info in args.items():
        acc = kernel["params"].get(name)
        if not info["big"] or not acc:
            continue
        for kind in ("load", "store"):
            widths = [int(b) for b in acc[f"tile_{kind}_bits"]]
            if widths and min(widths) < info["allowed_bits"]:
                problems.append(f"{name}: {min(widths)}-bit {kind}s where alignment allows "
                                f"{info['allowed_bits']}")
    return problems


def _analyze_launch(case: Case, index: int, device: Device) -> tuple[str, dict]:
    """Worker: the analysis of launch ``index`` of ``case`` (processes share no launch
    objects; they record the case again)."""
    spec = specialize(case_launches(case)[index])
    return spec.key, analyze(spec, device)


def _pool(jobs: int):
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def default_jobs() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


def run(case_list: list[Case], device: Device = H200, jobs: int = 1, progress=None) -> dict:
    """The report of ``case_list``: a JSON-ready document (see :mod:`.report`). ``jobs``:
    processes compiling at once (the analyses not in the disk cache)."""
    from . import bytes_model

    start = time.perf_counter()
    rows, todo, kernels = [], {}, {}
    for case in case_list:
        numel = math.prod(case.dims)
        launches = []
        for i, launch in enumerate(case_launches(case)):
            spec = specialize(launch)
            if spec.key not in kernels and spec.key not in todo:
                hit = cached(spec)
                if hit is not None:
                    kernels[spec.key] = hit
                else:
                    todo[spec.key] = (case, i, spec)
            launches.append({"kernel": spec.kernel, "key": spec.key,
                             "grid": list(launch.grid), "programs": math.prod(launch.grid),
                             "args": arg_table(launch, numel)})
        rows.append((case, launches))
    enumerate_s = time.perf_counter() - start
    done = 0
    if jobs > 1 and len(todo) > 1:
        with _pool(jobs) as pool:
            futures = {pool.submit(_analyze_launch, case, i, device): key
                       for key, (case, i, _) in todo.items()}
            for fut in concurrent.futures.as_completed(futures):
                key, result = fut.result()
                if key != futures[fut]:
                    raise RuntimeError(f"a worker specialized {result['kernel']} differently "
                                       f"({key} != {futures[fut]})")
                kernels[key] = result
                done += 1
                if progress:
                    progress(done, len(todo), result["kernel"])
    else:
        for key, (_, _, spec) in todo.items():
            kernels[key] = analyze(spec, device)
            done += 1
            if progress:
                progress(done, len(todo), spec.kernel)
    compile_s = time.perf_counter() - start - enumerate_s
    out_rows = []
    for case, launches in rows:
        for lau in launches:
            lau["problems"] = check(kernels[lau["key"]], lau["args"])
        traffic = bytes_model.model(case, launches, kernels, device)
        for lau in launches:
            for info in lau["args"].values():
                info.pop("id", None)
        out_rows.append({"op": case.op, "p": case.p, "pass": case.pass_,
                         "shape": list(case.dims), "shape_name": "x".join(map(str, case.dims)),
                         "dtype": case.dtype, "layout": case.layout, "launches": launches,
                         "bytes": traffic})
    import triton

    from .compile import tool

    return {
        "label": LABEL,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_model": dataclasses.asdict(device),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "ptxas": _ptxas_version(tool), "python": platform.python_version()},
        "target": f"cuda sm_{device.capability}",
        "cases": len(case_list), "unique_kernels": len(kernels), "compiled": len(todo),
        "elapsed_s": {"enumerate": round(enumerate_s, 1), "compile": round(compile_s, 1)},
        "assumptions": bytes_model.ASSUMPTIONS + ASSUMPTIONS,
        "kernels": kernels, "rows": out_rows,
    }


ASSUMPTIONS = [
    "specialization: Triton's JIT on sm_90; pointers are the tensors' storage offsets from a "
    "256-byte aligned base (the caching allocator's blocks are at least that aligned)",
    "registers and frame from the cubin; spills from ptxas's log (a stack frame without spills "
    "is local memory the code asked for, e.g. libdevice's cosf argument reduction); shared "
    "memory = the cubin's static (on sm_90 it includes 1 KB reserved when the kernel uses "
    "shared memory) + Triton's dynamic",
    "occupancy: CUDA's calculator for sm_90 (registers in 256-register warp units per "
    "sub-partition, shared memory + 1 KB per block of 228 KB, 64 warps, 32 blocks per SM)",
    "access widths: bits per thread of each SASS LDG/STG (static count; ptxas may unroll a "
    "loop); a tile access is a load/store of a 2-D block of pointers in the Triton IR, matched "
    "to the PTX (whose widths the SASS keeps) by source location; loads that match no IR "
    "operation (libdevice's cosf reduction table in the noisy kernels) count in ldg only",
]


def _ptxas_version(tool) -> str | None:
    import subprocess

    try:
        out = subprocess.run([tool("ptxas"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "release" in line:
            return line.split("release")[-1].strip().split(",")[0]
    return None


__all__ = ["H200", "LABEL", "OPS", "PASSES", "Case", "Device", "LaunchSpec", "allowed_bits",
           "analyze", "arg_table", "case_launches", "cases", "check", "default_jobs", "run",
           "specialize"]
