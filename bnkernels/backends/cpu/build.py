"""Builds and loads the cpu backend's C kernels (``kernels.c``): compiled once with the system
C compiler (``-O3 -march=native``, ~3 s) into ``$XDG_CACHE_HOME/bnkernels/cpu-<hash>.so``
(default ``~/.cache/bnkernels``), the hash covering the sources (:data:`SOURCES`), the compiler
command and the machine (its CPU's flags: the code is built for this CPU); a cached library is
loaded with ctypes at once. Every library is checked against the reference formulas on a small input
before it is used; any failure (no compiler, a failed compile, load or check) is a reason the
backend gives (``available_backends()``), and "auto" then takes the reference backend."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SOURCES = ("kernels.c", "kernels_impl.h", "../reference/philox.h")
"""The files the library is built from (relative to this folder; the cache's hash covers them
all): ``kernels.c`` includes the other two (the Philox rounds are the reference's)."""
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-std=gnu11")

_LOCK = threading.Lock()
_LIB = None  # the loaded library, or a str: why there is none (None: not looked yet)


def compilers() -> list[list[str]]:
    """Commands to try, in order: Python's own ``CC`` (sysconfig), then ``cc`` and ``gcc``."""
    found = []
    for cmd in (os.environ.get("CC") or "", sysconfig.get_config_var("CC") or "", "cc", "gcc"):
        argv = shlex.split(cmd)
        if argv and argv not in found and shutil.which(argv[0]) is not None:
            found.append(argv)
    return found


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnkernels"


def library_path(cc: list[str]) -> Path:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((_HERE / name).read_bytes())
    h.update(repr((cc, FLAGS, platform.machine(), _cpu_flags())).encode())
    return cache_root() / f"cpu-{h.hexdigest()[:16]}.so"


def _compile(cc: list[str], out: Path) -> str | None:
    """Compile into ``out`` (atomically: a temporary file renamed); the error, or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *FLAGS, str(_HERE / "kernels.c"), "-o", tmp, "-lm"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        if done.returncode != 0:
            return (f"{shlex.join(cc)} failed on kernels.c: "
                    f"{done.stderr.decode(errors='replace').strip()[-500:]}")
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suf in ("f32", "f64"):
        getattr(lib, f"bnk_bn_fwd_{suf}").argtypes = [
            p, p, i64, i64, i64, i32, i32, p, p, f64, f64, p, p, p, p, p, p, i32]
        getattr(lib, f"bnk_bn_bwd_{suf}").argtypes = [
            p, p, p, i64, i64, i64, i32, i32, p, p, p, p, i32, p, p, p, p]
        getattr(lib, f"bnk_lp_fwd_{suf}").argtypes = [
            p, p, i64, i64, i64, i32, i32, i32, i32, p, p, f64, f64, p, p, p, p]
        getattr(lib, f"bnk_lp_bwd_{suf}").argtypes = [
            p, p, p, i64, i64, i64, i32, i32, i32, p, p, p, f64, p, p]
        for name in ("bn_fwd", "bn_bwd", "lp_fwd", "lp_bwd"):
            getattr(lib, f"bnk_{name}_{suf}").restype = None
    lib.bnk_noise_prep.argtypes = [ctypes.c_uint64, ctypes.c_uint32, i64, i64, i64, f64, f64,
                                   f64, p, p, p, p]
    lib.bnk_noise_prep.restype = None


def _load():
    ccs = compilers()
    if not ccs:
        return "no C compiler found (set CC, or install cc/gcc)"
    errors = []
    for cc in ccs:
        path = library_path(cc)
        if not path.exists():
            err = _compile(cc, path)
            if err:
                errors.append(err)
                continue
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except OSError as e:
            errors.append(f"{path} does not load: {e}")
            continue
        return lib
    return "; ".join(errors)


def library():
    """The loaded library, or a str saying why there is none (looked for once per process)."""
    global _LIB
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                try:
                    _LIB = _load()
                except Exception as e:  # a broken cache directory, a timeout, ...
                    _LIB = f"the C kernels could not be built: {type(e).__name__}: {e}"
    return _LIB
