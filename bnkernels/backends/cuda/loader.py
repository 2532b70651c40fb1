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

Environment: ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs', else "8.0;9.0"),
``NVCC_THREADS`` and ``MAX_JOBS`` (build parallelism), ``XDG_CACHE_HOME`` (cache),
``BNKERNELS_SKIP_CUDA_BUILD=1`` (never JIT-build).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import shutil
import time
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


def _prebuilt():
    """The prebuilt extension if it exists and matches the sources here (or there are none)."""
    try:
        mod = importlib.import_module(cuda_build.PREBUILT)
    except ImportError:
        return None
    if cuda_build.have_sources() and mod.SOURCE_HASH != cuda_build.source_hash():
        warnings.warn(f"bnkernels: the prebuilt CUDA extension ({mod.SOURCE_HASH}) is not built "
                      f"from the current csrc/ ({cuda_build.source_hash()}); using a JIT build",
                      stacklevel=3)
        return None
    return mod


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


@functools.cache
def _have_prebuilt() -> bool:
    return importlib.util.find_spec(cuda_build.PREBUILT) is not None


def is_built() -> bool:
    """True when the extension loads without compiling: loaded, prebuilt, or JIT-cached."""
    if _ext is not None or _have_prebuilt():
        return True
    try:
        return library_path().exists()
    except Exception:  # e.g. an unparsable TORCH_CUDA_ARCH_LIST
        return False


def extension_reasons() -> list[str]:
    """Why the extension cannot be loaded (empty when it is loaded, prebuilt, cached, or can be
    built on first use)."""
    if _ext is not None:
        return []
    if _build_error is not None:
        return [f"the CUDA extension failed to build: {_build_error}"]
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
    directory = _jit_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mod = cpp_extension.load(
            name=cuda_build.EXT_NAME,
            sources=[str(cuda_build.CSRC / s) for s in cuda_build.SOURCES],
            extra_cflags=cuda_build.cxx_flags(),
            extra_cuda_cflags=cuda_build.nvcc_flags(archs),
            extra_include_paths=[str(cuda_build.CSRC)],
            build_directory=str(directory),
            verbose=verbose,
            with_cuda=True,
        )
    except Exception as e:
        _build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
        raise
    _ext = mod
    return Path(mod.__file__)


def load():
    """The extension module: prebuilt, cached (imported directly), or built now (the first call
    may take minutes)."""
    global _ext
    if _ext is None:
        _ext = _prebuilt()
    if _ext is None and library_path().exists():
        _ext = _import_library(library_path())
    if _ext is None:
        if _build_error is not None:
            raise RuntimeError(f"bnkernels: the CUDA extension failed to build: {_build_error}")
        _log.info("building the CUDA extension from %s into %s (once; a minute or more)",
                  cuda_build.CSRC, _jit_directory())
        started = time.perf_counter()
        build()
        _log.info("built the CUDA extension in %.0f s", time.perf_counter() - started)
    return _ext
