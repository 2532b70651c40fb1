"""The CUDA C++ backend's loader: the ``csrc/`` extension, prebuilt, JIT-cached or built now.

Loading, in order: the prebuilt module ``bnkernels._cuda_ext`` (``BNKERNELS_BUILD_CUDA=1 pip
install --no-build-isolation .``) if it was built from the current sources; else a just-in-time
build with ``torch.utils.cpp_extension.load`` (ninja), cached under
``$XDG_CACHE_HOME/bnkernels/cuda-<hash>`` (default ``~/.cache/bnkernels``), the hash covering the
sources, flags, torch, CUDA, Python and the GPU architectures (see
:mod:`bnkernels.backends.cuda.build_config`); a cached build is imported directly, without
the compiler.

Build explicitly (works with nvcc and no GPU; prints the path of the shared library)::

    CUDA_HOME=/usr/local/cuda python -m bnkernels.backends.cuda build

The plans that call it are in :mod:`.plans`.

A cached build counts only when complete: the build runs in a directory of its own, the
library is moved into the cache with an atomic rename (another process, e.g. another torchrun
rank, never opens a half-written file) and a record of its size and SHA-256 is written next
to it last; a library that does not match its record (truncated, corrupt, from an older
loader) is not "built", and a library that fails to import is rebuilt once. A prebuilt module
counts only when it imports and was built from the current sources, so ``auto`` takes Triton
rather than a stale or broken module. A failed build keeps the compiler's whole output
(``build_error()``; the reasons list its error lines).

Environment: ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs', else "8.0;9.0+PTX"),
``NVCC_THREADS`` and ``MAX_JOBS`` (build parallelism), ``XDG_CACHE_HOME`` (cache),
``BNKERNELS_SKIP_CUDA_BUILD=1`` (never JIT-build).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

from . import build_config as cuda_build

_log = logging.getLogger(__name__)  # under the "bnkernels" logger

# ----------------------------------------------------------------------------- loading

_ext = None  # the loaded extension module
_build_error: str | None = None  # why the last JIT build failed (not retried in this process)


def _toolkit_problem() -> str | None:
    """Why the CUDA toolkit torch's build would use (its CUDA_HOME) cannot compile, or None."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # pragma: no cover - a torch without cpp_extension
        return f"torch.utils.cpp_extension is unusable ({e})"
    if not CUDA_HOME:
        return "no CUDA toolkit (nvcc) found: set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda"
    for part in (("bin", "nvcc"), ("include", "cuda_runtime.h")):
        if not Path(CUDA_HOME, *part).exists():
            return (f"torch's CUDA_HOME={CUDA_HOME} has no {'/'.join(part)}: set CUDA_HOME to "
                    "the CUDA toolkit, e.g. CUDA_HOME=/usr/local/cuda")
    return None


@functools.cache
def _prebuilt_module():
    """The prebuilt extension if it imports and matches the sources here (or there are none);
    else None, with a warning saying why (once)."""
    if importlib.util.find_spec(cuda_build.PREBUILT) is None:
        return None
    try:
        mod = importlib.import_module(cuda_build.PREBUILT)
    except Exception as e:  # built for another torch or CUDA, or a broken file
        warnings.warn(f"bnkernels: the prebuilt CUDA extension does not import ({e}); "
                      "not using it", stacklevel=3)
        return None
    if cuda_build.have_sources() and getattr(mod, "SOURCE_HASH", None) != cuda_build.source_hash():
        warnings.warn(f"bnkernels: the prebuilt CUDA extension ({getattr(mod, 'SOURCE_HASH', '?')})"
                      f" is not built from the current csrc/ ({cuda_build.source_hash()}); "
                      "not using it", stacklevel=3)
        return None
    return mod


def _prebuilt():
    return _prebuilt_module()


@functools.lru_cache(maxsize=8)
def _jit_directory_for(archs: str) -> Path:
    return cuda_build.build_directory(archs, torch.__version__, torch.version.cuda)


def _jit_directory() -> Path:
    return _jit_directory_for(cuda_build.arch_list())


def _import_library(path: Path):
    """Import a built extension module from its shared library (no compiler involved)."""
    spec = importlib.util.spec_from_file_location(cuda_build.EXT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def library_path() -> Path:
    """Where the JIT build puts (or has put) the shared library."""
    return _jit_directory() / f"{cuda_build.EXT_NAME}.so"


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".complete.json")


def _digest(path: Path) -> dict:
    st = path.stat()
    return _digest_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, size: int, mtime_ns: int) -> dict:
    """(read once per file version: is_built() is asked on every auto dispatch)"""
    return {"size": size, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def library_complete(library: Path | None = None) -> bool:
    """The cached library exists and matches the record its build wrote last (size, SHA-256):
    not truncated, not half-written, not corrupt."""
    library = library_path() if library is None else library
    try:
        record = json.loads(_record_path(library).read_text())
        return library.is_file() and record == _digest(library)
    except (OSError, ValueError):
        return False


def _install(built: Path, library: Path) -> None:
    """Move a finished build's library into the cache: atomic renames, the record last."""
    tmp = library.with_name(f".{library.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    shutil.copyfile(built, tmp)
    digest = _digest(tmp)
    os.replace(tmp, library)
    record = _record_path(library)
    tmp_record = record.with_name(f".{record.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp_record.write_text(json.dumps(digest))
    os.replace(tmp_record, record)


def build_error() -> str | None:
    """The whole output of this process's last failed build (None: none failed)."""
    return _build_error


def _error_summary(text: str) -> str:
    """The compiler's error lines of a build's output (its last line where it has none)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("ninja: build")]
    keep = list(dict.fromkeys(errors[:12])) or lines[-1:]
    return " | ".join(keep) if keep else "(no output)"


def build_reasons() -> list[str]:
    """Why a JIT build cannot run here (empty: it can)."""
    reasons = []
    if os.environ.get("BNKERNELS_SKIP_CUDA_BUILD", "0") == "1":
        reasons.append("BNKERNELS_SKIP_CUDA_BUILD=1 forbids building the CUDA extension")
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is not a CUDA build")
    if not cuda_build.have_sources():
        reasons.append(f"the CUDA sources are not at {cuda_build.CSRC} (bnkernels' wheel and "
                       "sdist ship them as bnkernels/csrc: reinstall the package, or prebuild "
                       "with BNKERNELS_BUILD_CUDA=1)")
    problem = _toolkit_problem()
    if problem is not None:
        reasons.append(problem)
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        reasons.append("ninja is not installed (pip install 'bnkernels[cuda]', or pip "
                       "install ninja)")
    return reasons


def is_built() -> bool:
    """True when the extension loads without compiling: loaded, a prebuilt module that imports
    and matches the sources, or a complete JIT-cached library."""
    if _ext is not None or _prebuilt_module() is not None:
        return True
    try:
        return library_complete()
    except Exception:  # e.g. an unparsable TORCH_CUDA_ARCH_LIST
        return False


def extension_reasons() -> list[str]:
    """Why the extension cannot be loaded (empty when it is loaded, prebuilt, cached, or can be
    built on first use)."""
    if _ext is not None:
        return []
    if _build_error is not None:
        return [f"the CUDA extension failed to build: {_error_summary(_build_error)}"]
    if is_built():
        return []
    return [f"the CUDA extension is not built, and cannot be built here: {r}"
            for r in build_reasons()]


def build(verbose: bool = False) -> Path:
    """JIT-compile the extension (a no-op when the cache is up to date); returns the path of
    the shared library. Needs nvcc and ninja, not a GPU."""
    global _ext, _build_error
    reasons = build_reasons()
    if reasons:
        raise RuntimeError("bnkernels: cannot build the CUDA extension:\n  " +
                           "\n  ".join(reasons))
    from torch.utils import cpp_extension

    archs = cuda_build.arch_list()
    library = _jit_directory_for(archs) / f"{cuda_build.EXT_NAME}.so"
    if library_complete(library):
        if _ext is None:
            _ext = _import_library(library)
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # A directory of this build's own: another process building at the same time never sees
    # (or opens) a half-written file; the finished library is renamed into the cache.
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=library.parent))
    try:
        mod = cpp_extension.load(
            name=cuda_build.EXT_NAME,
            sources=[str(cuda_build.CSRC / s) for s in cuda_build.SOURCES],
            extra_cflags=cuda_build.cxx_flags(),
            extra_cuda_cflags=cuda_build.nvcc_flags(archs),
            extra_include_paths=[str(cuda_build.CSRC)],
            build_directory=str(work),
            verbose=verbose,
            with_cuda=True,
        )
        _install(Path(mod.__file__), library)
    except Exception as e:
        _build_error = f"{type(e).__name__}: {e}"  # the compiler's whole output
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a loaded library stays mapped
    _ext = mod
    return library


def load():
    """The extension module: prebuilt, cached (imported directly), or built now (the first call
    may take minutes)."""
    global _ext
    if _ext is None:
        _ext = _prebuilt()
    if _ext is None and library_complete():
        try:
            _ext = _import_library(library_path())
        except (ImportError, OSError) as e:  # complete but unloadable: rebuild it once
            warnings.warn(f"bnkernels: the cached CUDA extension does not load ({e}); "
                          "rebuilding it", stacklevel=2)
            _record_path(library_path()).unlink(missing_ok=True)
    if _ext is None:
        if _build_error is not None:
            raise RuntimeError(f"bnkernels: the CUDA extension failed to build: {_build_error}")
        _log.info("building the CUDA extension from %s into %s (once; a minute or more)",
                  cuda_build.CSRC, _jit_directory())
        started = time.perf_counter()
        build()
        _log.info("built the CUDA extension in %.0f s", time.perf_counter() - started)
    return _ext
