"""Specialize and compile recorded launches for sm_90 with Triton's own JIT, and read back the
kernel: registers, spills, shared memory, global access widths, occupancy.

The JIT runs as on a GPU: the active Triton driver is replaced by one that answers "device 0,
sm_90" (:class:`_SM90Driver`), tensors are meta tensors whose ``data_ptr()`` is their storage
offset in bytes (a caching-allocator block is at least 256-byte aligned, so pointer divisibility
is the offset's), and ``JITFunction.run(warmup=True)`` does the rest: Triton's binder decides
the signature, which pointers and integers are divisible by 16, which integers equal 1, the
constexprs and ``do_not_specialize``; its cache hook hands us that specialization (compiling
nothing) and, for each distinct one, the same call compiles it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import parse
from .launches import LaunchSpec


def _analysis_version() -> str:
    """A hash of the code that reads kernels back (this file and :mod:`.parse`): cached
    analyses made by other code are not reused."""
    h = hashlib.sha256()
    for name in ("compile.py", "parse.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


ANALYSIS_VERSION = _analysis_version()


@dataclass(frozen=True)
class Device:
    """The GPU the kernels are compiled and judged for (sm_90 limits per SM)."""

    name: str = "NVIDIA H200 (sm_90)"
    capability: int = 90
    sms: int = 132
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # each holds a quarter of the register file
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation
    l2_bytes: int = 50 * 2**20
    bandwidth: float = 4.2e12  # bytes/s: measured device-to-device copy bandwidth (4.2-4.3 TB/s)


H200 = Device()


# ----------------------------------------------------------------------------- the JIT as on sm_90


class _SM90Driver:
    """The part of a Triton driver the JIT asks for when it specializes and compiles (not when
    it launches): device 0, stream 0, target sm_90."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def _sm90_jit(hook=None, capability: int = 90):
    """Triton's JIT answering for sm_90 (and calling ``hook`` where it would compile)."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    knobs = getattr(triton, "knobs", None)
    new_knobs = knobs is not None and hasattr(knobs.runtime, "jit_cache_hook")
    old_hook = knobs.runtime.jit_cache_hook if new_knobs else getattr(JITFunction, "cache_hook",
                                                                      None)
    active_is_property = isinstance(getattr(type(driver), "active", None), property)
    old_driver = driver._active if active_is_property else driver.active
    driver.set_active(_SM90Driver(capability))
    if new_knobs:
        knobs.runtime.jit_cache_hook = hook
    else:  # triton < 3.4: a class attribute
        JITFunction.cache_hook = hook
    try:
        yield
    finally:
        if new_knobs:
            knobs.runtime.jit_cache_hook = old_hook
        else:
            JITFunction.cache_hook = old_hook
        if active_is_property:
            driver._active = old_driver
        else:
            driver.set_active(old_driver)


def _meta(a):
    """A launch argument as the JIT sees it without a GPU: a (fake) tensor becomes a meta tensor
    with the same storage offset, whose data_ptr() is that offset in bytes."""
    if isinstance(a, torch.Tensor):
        size = max(a.untyped_storage().nbytes() // a.element_size(), 1)
        return torch.empty(size, dtype=a.dtype, device="meta").as_strided(
            a.shape, a.stride(), a.storage_offset())
    return a


def _jit_run(launch: LaunchSpec):
    """``kernel.run(..., warmup=True)``: specialize (and compile, unless a hook stops it)."""
    return launch.kernel.run(*map(_meta, launch.args), grid=launch.grid, warmup=True,
                             **{k: _meta(v) for k, v in launch.kwargs.items()})


@dataclass
class Specialization:
    """What the JIT compiles for one launch; ``key`` identifies it (the kernel's source and its
    dependencies, the specialization, the options, the Triton version)."""

    kernel: str
    key: str
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # constexpr argument name -> value (repr)
    num_warps: int
    num_stages: int
    launch: LaunchSpec = field(repr=False, default=None)


def specialize(launch: LaunchSpec) -> Specialization:
    """The specialization Triton's JIT gives ``launch`` on sm_90 (nothing is compiled)."""
    import triton

    seen: dict = {}

    def hook(*args, **kw):
        seen.update(kw.get("compile") or {})
        return True  # stop before compiling

    kernel = launch.kernel
    kernel.device_caches.clear()  # a kernel already in the JIT's cache would skip the hook
    with _sm90_jit(hook):
        _jit_run(launch)
    kernel.device_caches.clear()
    if not seen:
        raise RuntimeError(f"{kernel.__name__}: Triton's JIT reported no specialization")
    names = list(kernel.arg_names)
    sig = seen.get("signature", {})
    if not all(isinstance(k, str) for k in sig):  # older Triton: keyed by index
        sig = {names[i]: v for i, v in zip(range(len(names)), sig.values())}
    constexprs = {k: repr(v) for k, v in launch.kwargs.items()
                  if k in names and sig.get(k) == "constexpr"}
    parts = [ANALYSIS_VERSION, triton.__version__, kernel.cache_key, repr(seen.get("key")),
             repr(sorted(sig.items())), repr(seen.get("constants")), repr(seen.get("configs")),
             seen.get("num_warps"), seen.get("num_stages"), seen.get("num_ctas")]
    key = hashlib.sha256(repr(parts).encode()).hexdigest()[:24]
    return Specialization(kernel.__name__, key, dict(sig), constexprs,
                          int(seen.get("num_warps", 4)), int(seen.get("num_stages", 3)), launch)


# ----------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """ptxas / cuobjdump / nvdisasm: Triton's bundled copy, the CUDA toolkit's, or on PATH."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older Triton: no knobs; look further
        pass
    import triton

    for c in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name,
              Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name):
        if c.exists():
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found (looked in Triton's bundled binaries, $CUDA_HOME/bin "
                       "and PATH): install the CUDA toolkit or a Triton wheel that bundles it")


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (slow: ~0.3 s of CPU; the report decodes the machine code
    itself, see :func:`.parse.decode_sass`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {proc.stderr.strip()[:500]}")
    return proc.stdout


def ptxas_verbose(ptx: str, arch: str = "sm_90a") -> str:
    """``ptxas -v`` on a PTX listing (Triton's ptxas, the flags Triton passes): the log."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch}",
                               str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:500]}")
    return proc.stdout + proc.stderr


@contextlib.contextmanager
def _ptxas_log():
    """Capture the ``ptxas -v`` log of the compiles inside (Triton >= 3.4 prints it when
    ``knobs.nvidia.dump_ptxas_log`` is set; ``always_compile`` makes it compile rather than
    read its own cache). Yields a StringIO; empty where this Triton cannot."""
    buf = io.StringIO()
    try:
        from triton import knobs

        nv, comp = knobs.nvidia, knobs.compilation
        old = (nv.dump_ptxas_log, comp.always_compile)
    except (ImportError, AttributeError):
        yield buf
        return
    nv.dump_ptxas_log, comp.always_compile = True, True
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        nv.dump_ptxas_log, comp.always_compile = old


# ----------------------------------------------------------------------------- analysis


def occupancy(regs: int, smem: int, num_warps: int, device: Device = H200) -> dict:
    """Resident blocks and warps per SM, and what limits them, as CUDA's occupancy calculator
    computes them on ``device``: registers per warp rounded up to the 256-register allocation
    unit, warps per sub-partition limited by its quarter of the register file; shared memory
    per block plus the 1 KB the driver reserves; 64 warps and 32 blocks per SM."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / device.reg_alloc_unit) * device.reg_alloc_unit
    warps_per_sub = (device.regs_per_sm // device.sub_partitions) // regs_per_warp
    by_regs = (warps_per_sub * device.sub_partitions) // num_warps
    if regs_per_warp * num_warps > device.regs_per_block:
        by_regs = 0
    by_smem = device.max_blocks_per_sm if smem == 0 else \
        device.smem_per_sm // (smem + device.smem_reserved_per_block)
    if smem > device.smem_per_block:
        by_smem = 0
    limits = {"warps": device.max_warps_per_sm // num_warps,
              "blocks": device.max_blocks_per_sm, "registers": by_regs, "shared memory": by_smem}
    blocks = min(limits.values())
    limiter = next(k for k, v in limits.items() if v == blocks)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / device.max_warps_per_sm, "limiter": limiter,
            "limits": limits}


def _cache_dir() -> Path:
    path = Path(os.environ.get("BNKERNELS_SASS_CACHE")
                or Path.home() / ".cache" / "bnkernels" / "sass")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached(spec: Specialization) -> dict | None:
    """The analysis of ``spec`` from the disk cache, or None."""
    path = _cache_dir() / f"{spec.kernel}-{spec.key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def analyze(spec: Specialization, device: Device = H200) -> dict:
    """Compile ``spec`` for sm_90 (unless the disk cache has it) and read the kernel back:
    resources (cubin and ptxas's log), global accesses (SASS decoded from the cubin, attributed
    to kernel arguments through the PTX and the Triton IR) and occupancy. JSON-ready."""
    hit = cached(spec)
    if hit is not None:
        return hit
    launch = spec.launch
    start = time.perf_counter()
    with _sm90_jit(), _ptxas_log() as log:
        compiled = _jit_run(launch)
    launch.kernel.device_caches.clear()
    if compiled is None:
        raise RuntimeError(f"{spec.kernel}: Triton's JIT returned no compiled kernel")
    compile_s = time.perf_counter() - start
    asm = compiled.asm
    cubin = parse.read_cubin(asm["cubin"])
    ptxas = parse.parse_ptxas_log(log.getvalue())
    ptxas_source = "Triton's compile"
    if ptxas is None:  # older Triton: compile the PTX again for the log
        ptxas = parse.parse_ptxas_log(ptxas_verbose(asm["ptx"], f"sm_{device.capability}a"))
        ptxas_source = "ptxas -v rerun"
    if ptxas is None:
        raise RuntimeError(f"{spec.kernel}: no resource usage in ptxas's log")
    ptx = parse.parse_ptx(asm["ptx"])
    arg_names = [n for n in launch.kernel.arg_names if spec.signature.get(n) != "constexpr"]
    ttir = parse.parse_ttir(asm["ttir"], arg_names)
    md = compiled.metadata
    num_warps = int(getattr(md, "num_warps", spec.num_warps))
    dyn_smem = int(getattr(md, "shared", 0) or 0)
    sass = cubin["sass"]
    ptx_widths = {a["kind"]: set() for a in ptx}
    for a in ptx:
        ptx_widths[a["kind"]].add(a["bits"])
    out = {
        "kernel": spec.kernel, "key": spec.key, "num_warps": num_warps,
        "num_stages": spec.num_stages, "threads": 32 * num_warps,
        "regs": cubin["regs"], "ptxas_regs": ptxas["regs"], "ptxas_log": ptxas_source,
        "stack_frame": ptxas["stack_frame"], "local": cubin["frame"],
        "spill_stores": ptxas["spill_stores"], "spill_loads": ptxas["spill_loads"],
        "static_smem": cubin["static_smem"], "dynamic_smem": dyn_smem,
        "smem": cubin["static_smem"] + dyn_smem,
        "sass": {k: ({str(b): n for b, n in sorted(v.items())} if isinstance(v, dict) else v)
                 for k, v in sass.items()},
        # ptxas keeps PTX's access widths (it unrolls loops, so counts may differ)
        "ptx_widths_match_sass": (sorted(ptx_widths.get("load", ())) == sorted(sass["LDG"])
                                  and sorted(ptx_widths.get("store", ())) == sorted(sass["STG"])),
        "div16": [a["name"] for a in ttir["args"] if a["div16"]],
        "specialized_to_1": sorted(n for n, t in spec.signature.items()
                                   if t == "constexpr" and n not in spec.constexprs),
        "constexprs": spec.constexprs,
        "compile_s": round(compile_s, 3),
        **parse.access_summary(ptx, ttir),
    }
    out["occupancy"] = occupancy(out["regs"], out["smem"], num_warps, device)
    # Little's law: bytes in flight per SM = independent tile loads per iteration x width x
    # threads x resident blocks (an H100/H200 needs about 25-30 KB per SM near copy bandwidth).
    out["inflight_per_sm"] = (out["tile_load_bytes_per_thread"] * out["threads"]
                              * out["occupancy"]["blocks_per_sm"])
    path = _cache_dir() / f"{spec.kernel}-{spec.key}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return out
