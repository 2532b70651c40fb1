"""The CUDA C++ backend: loads the ``csrc/`` extension and runs its kernels (thin launchers).

Loading, in order: the prebuilt module ``bnkernels._cuda_ext`` (``BNKERNELS_BUILD_CUDA=1 pip
install --no-build-isolation .``) if it was built from the current sources; else a just-in-time
build with ``torch.utils.cpp_extension.load`` (ninja), cached under
``$XDG_CACHE_HOME/bnkernels/cuda-<hash>`` (default ``~/.cache/bnkernels``), the hash covering the
sources, flags, torch, CUDA, Python and the GPU architectures (see
:mod:`bnkernels.backends.cuda.build_config`); a cached build is imported directly, without
the compiler.

Build explicitly (works with nvcc and no GPU; prints the path of the shared library)::

    CUDA_HOME=/usr/local/cuda python -m bnkernels.backends.cuda build

The launchers below mirror :mod:`bnkernels.backends.triton` (same entry points, signatures and
return conventions; see :class:`bnkernels.backends._base.Backend`). Each views its input in one
of the two layouts the kernels read -- "ncs", (N, C, S) contiguous, or "mc", (N*S, C)
contiguous (channels last, or (N, C)) -- without copying, allocates the outputs with the input's
own strides, and hands both to the extension, which checks them again. Inputs with other strides
are copied to a contiguous layout explicitly, never misread. No host synchronization: a noisy
step given as a tensor is read by the kernels.

BatchNorm training runs the persistent single-read kernels (csrc/persistent.cu) wherever the
tensor fits on chip, except while a CUDA graph is being captured, and the multi-pass kernels
otherwise. That default is not tuned by measurement yet (no GPU was at hand when it was written).

Environment: ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs', else "8.0;9.0"),
``NVCC_THREADS`` and ``MAX_JOBS`` (build parallelism), ``XDG_CACHE_HOME`` (cache),
``BNKERNELS_SKIP_CUDA_BUILD=1`` (never JIT-build), ``BNKERNELS_CUDA_PERSISTENT=0`` (multi-pass
only), ``BNKERNELS_CUDA_INDEX64=1`` (a test hook: 64-bit index arithmetic on any size).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layout import layout_of
from . import build_config as cuda_build

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
        reasons.append(f"the CUDA sources are not at {cuda_build.CSRC} (install from a source "
                       "checkout, or prebuild with BNKERNELS_BUILD_CUDA=1)")
    problem = _toolkit_problem()
    if problem is not None:
        reasons.append(problem)
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        reasons.append("ninja is not installed (pip install ninja)")
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
        build()
    return _ext


# ----------------------------------------------------------------------------- launch options

# Launch overrides, for tests: "split" (programs per channel of the split reductions; 0 = the
# heuristic) and "path" ("auto", "multipass" or "persistent" for the BatchNorm training
# kernels; "persistent" raises where it cannot run).
_OVERRIDES: dict = {}
_PATHS = {"auto": 0, "multipass": 1, "persistent": 2}


@contextlib.contextmanager
def override_config(**kwargs):
    """Force launch parameters: ``split=int``, ``path="auto"|"multipass"|"persistent"``."""
    unknown = set(kwargs) - {"split", "path"}
    if unknown:
        raise ValueError(f"unknown launch overrides {sorted(unknown)}")
    if "path" in kwargs and kwargs["path"] not in _PATHS:
        raise ValueError(f"path must be one of {list(_PATHS)}, got {kwargs['path']!r}")
    from .. import clear_plans

    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    clear_plans()
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)
        clear_plans()


def _split() -> int:
    return int(_OVERRIDES.get("split", 0))


# Read once, at import: nothing on the hot path reads the environment.
_MULTIPASS_ONLY = os.environ.get("BNKERNELS_CUDA_PERSISTENT", "1") == "0"


def _path() -> int:
    """The BatchNorm training path: override, else BNKERNELS_CUDA_PERSISTENT=0 (multi-pass
    only, read at import), else automatic (persistent where the tensor fits on chip)."""
    if "path" in _OVERRIDES:
        return _PATHS[_OVERRIDES["path"]]
    return 1 if _MULTIPASS_ONLY else 0


# ----------------------------------------------------------------------------- layouts


def _channels_last_format(x: torch.Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


@dataclass(frozen=True)
class _Layout:
    """An input seen as the kernels read it: ``t`` is (N, C, S) ("ncs") or (N*S, C) ("mc"),
    contiguous. ``dense`` is the tensor ``t`` views (the input itself, or a contiguous copy of
    it when its strides are neither layout); outputs are allocated like ``dense``."""

    kind: str
    t: torch.Tensor
    S: int
    dense: torch.Tensor
    source: torch.Tensor  # the caller's input

    def view(self, like: torch.Tensor) -> torch.Tensor:
        """``like`` (strided exactly as ``dense``) in the kernel layout: a view, no copy."""
        N, C = like.shape[0], like.shape[1]
        if self.kind == "ncs":
            return like.view(N, C, self.S)
        if like.is_contiguous():
            return like.view(N * self.S, C)
        return like.permute(0, *range(2, like.dim()), 1).view(N * self.S, C)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An output (strided as ``dense``) and its kernel-layout view."""
        out = torch.empty_like(self.dense)
        return out, self.view(out)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (x's shape, e.g. dy) in the kernel layout, copied only if strided otherwise."""
        if t.stride() != self.dense.stride():
            t = torch.empty_like(self.dense).copy_(t)
        return self.view(t)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """An output allocated by :meth:`empty`, with the strides torch.empty_like gives the
        caller's input (as PyTorch's ops and the registered ops' fake implementations)."""
        if self.dense is self.source:
            return out
        like = torch.empty_like(self.source)
        return out if like.stride() == out.stride() else like.copy_(out)


def _layout(x: torch.Tensor) -> _Layout:
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.dim() > 2 and S > 1 and x.is_contiguous():
        return _Layout("ncs", x.view(N, C, S), S, x, x)
    fmt = _channels_last_format(x)
    if x.is_contiguous() or (fmt is not None and x.is_contiguous(memory_format=fmt)):
        lay = _Layout("mc", x, S, x, x)  # (N, C), (N, C, 1, ...), or channels last
        return _Layout("mc", lay.view(x), S, x, x)
    xc = x.contiguous()  # any other strides: an explicit copy, never a misread
    kind = "ncs" if S > 1 else "mc"
    lay = _Layout(kind, xc, S, xc, x)
    return _Layout(kind, lay.view(xc), S, xc, x)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noise_args(noise, device: torch.device) -> tuple:
    """(config list or None, seed, step, step tensor or None) for the extension."""
    if noise is None:
        return None, 0, 0, None
    cfg, seed, step = noise
    values = [float(cfg.n_mu), float(cfg.n_sigma), float(cfg.r_mu), float(cfg.r_sigma)]
    if isinstance(step, torch.Tensor):
        step_t = step.reshape(1)
        if step_t.dtype != torch.int64:
            step_t = step_t.to(torch.int64)  # on the device: no synchronization
        return values, int(seed), 0, step_t.to(device)
    return values, int(seed), int(step) & 0xFFFFFFFF, None


# ----------------------------------------------------------------------------- BatchNorm


def batch_norm_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, noise=None):
    """Forward BatchNorm; ``(y, save_mean, save_invstd)``, ``(y, None, None)`` in eval mode.

    Training: the batch mean and 1/sqrt(biased var + eps) in fp32 (fp64 for fp64 x), running
    buffers updated in place on the device; one persistent cooperative kernel where x fits on
    chip (x read once), else statistics + apply. Eval: the running statistics."""
    ext = load()
    lay = _layout(x)
    relu = activation == "relu"
    y, yk = lay.empty()
    if training:
        mean, invstd = ext.bn_forward_train(lay.t, lay.S, yk, weight, bias, running_mean,
                                            running_var, float(momentum), float(eps), relu,
                                            *_noise_args(noise, x.device), _split(), _path())
        return lay.restore(y), mean, invstd
    ext.bn_apply(lay.t, lay.S, yk, running_mean, running_var, True, float(eps), weight, bias,
                 relu, *_noise_args(noise, x.device))
    return lay.restore(y), None, None


def batch_norm_stats(x):
    """Per-channel (mean, biased var), fp32/fp64 (SyncBatchNorm's first stage)."""
    lay = _layout(x)
    return load().bn_stats(lay.t, lay.S, _split())


def batch_norm_apply(x, mean, invstd, weight, bias, activation, noise=None):
    """y = act(w * (x - mean) * invstd + b) with given per-channel statistics."""
    ext = load()
    lay = _layout(x)
    y, yk = lay.empty()
    ext.bn_apply(lay.t, lay.S, yk, mean, invstd, False, 0.0, weight, bias,
                 activation == "relu", *_noise_args(noise, x.device))
    return lay.restore(y)


def batch_norm_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs, noise=None):
    """Backward BatchNorm; ``(dx, dweight, dbias)``, None where ``needs`` says so.

    ``mean``/``invstd`` are the saved batch statistics in training, and running_mean and
    1/sqrt(running_var + eps) in eval mode; the noise is regenerated, not stored."""
    need_dx, need_dw, need_db = needs
    ext = load()
    lay = _layout(x)
    dx = dxk = None
    if need_dx:
        dx, dxk = lay.empty()
    dw, db = ext.bn_backward(lay.like(dy), lay.t, lay.S, dxk, mean, invstd, weight, bias,
                             bool(training), activation == "relu",
                             bool(need_dw and weight is not None),
                             bool(need_db and bias is not None),
                             *_noise_args(noise, x.device), _split(), _path())
    return (lay.restore(dx) if need_dx else None), dw, db


def batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None):
    """[sum(g), sum(g * (x - mean))] per channel ([2, C]) for SyncBatchNorm."""
    lay = _layout(x)
    return load().bn_bwd_reduce(lay.like(dy), lay.t, lay.S, mean, invstd, weight, bias,
                                activation == "relu", *_noise_args(noise, x.device), _split())


def batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums, activation, noise=None):
    """Training dx given ``mean_sums`` = [mean(g), mean(g * (x - mean))] over the whole batch."""
    ext = load()
    lay = _layout(x)
    dx, dxk = lay.empty()
    ext.bn_bwd_dx(lay.like(dy), lay.t, lay.S, dxk, mean, invstd, weight, bias, mean_sums,
                  activation == "relu", *_noise_args(noise, x.device))
    return lay.restore(dx)


def noisy_batch_norm_noise(x, noise):
    """The (s, m) noise (fp32, x's shape, contiguous) that noisy BatchNorm applies to ``x``."""
    lay = _layout(x)
    cfg, seed, step, step_t = _noise_args(noise, x.device)
    s, m = load().noisy_bn_noise(lay.t, lay.S, cfg, seed, step, step_t)
    return s.view(x.shape), m.view(x.shape)


def persistent_plan(x, backward: bool = False) -> dict:
    """Whether the persistent single-read kernel takes ``x`` (runs nothing): fits, why not,
    blocks, blocks per channel (or channel group)."""
    lay = _layout(x)
    fits, why, blocks, per = load().persistent_plan(lay.t, lay.S, backward)
    return {"fits": fits, "why": why, "blocks": blocks, "per_channel": per}


# ----------------------------------------------------------------------------- l_p norm


def lp_norm_fwd(x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                centered):
    """Forward l_p normalization; ``(y, save_mean, save_scale)`` (s_p itself, not
    1/(s_p + eps)), ``(y, None, None)`` in eval mode."""
    ext = load()
    lay = _layout(x)
    y, yk = lay.empty()
    if training:
        mean, scale = ext.lp_forward_train(lay.t, lay.S, yk, float(p), bool(centered),
                                           running_mean, running_scale, weight, bias,
                                           float(momentum), float(eps), _split())
        return lay.restore(y), mean, scale
    inv = 1.0 / (running_scale.to(_acc(x.dtype)) + eps)
    ext.bn_apply(lay.t, lay.S, yk, running_mean, inv, False, 0.0, weight, bias, False,
                 None, 0, 0, None)
    return lay.restore(y), None, None


def lp_norm_bwd(dy, x, p, mean, scale, weight, bias, training, centered, eps, needs):
    """Backward l_p normalization; ``(dx, dweight, dbias)``, None where ``needs`` says so.

    Eval: running_mean and running_scale are constants, so this is BatchNorm's eval backward
    with invstd = 1/(running_scale + eps)."""
    if not training:
        inv = 1.0 / (scale.to(_acc(x.dtype)) + eps)
        return batch_norm_bwd(dy, x, mean, inv, weight, bias, False, None, needs)
    need_dx, need_dw, need_db = needs
    ext = load()
    lay = _layout(x)
    dx = dxk = None
    if need_dx:
        dx, dxk = lay.empty()
    dw, db = ext.lp_backward_train(lay.like(dy), lay.t, lay.S, dxk, float(p), bool(centered),
                                   mean, scale, weight, bias, float(eps),
                                   bool(need_dw and weight is not None),
                                   bool(need_db and bias is not None), _split())
    return (lay.restore(dx) if need_dx else None), dw, db


# ----------------------------------------------------------------------------- plans (hot path)


def _step_used(noise):
    """A snapshot of a tensor noise step for the backward (the step may advance first)."""
    if noise is not None and isinstance(noise[2], torch.Tensor):
        return noise[2].reshape(1).to(torch.int64, copy=True)
    return None


class BatchNormPlan:
    """One signature's BatchNorm calls: layout view, training path and split count resolved
    once (the extension is loaded when the plan is made); ``forward``/``backward`` follow
    :class:`bnkernels.backends._base.Backend`."""

    def __init__(self, sig):
        self.ext = load()
        self.lay = layout_of(sig.shape, sig.stride, sig.device)
        self.training = sig.training
        self.relu = sig.activation == "relu"
        self.split = _split()
        self.path = _path()

    def forward(self, x, running_mean, running_var, weight, bias, momentum, eps, noise,
                need_saved=True):
        lay = self.lay
        xc = lay.prepare(x)
        y = torch.empty_like(xc)
        view = lay.kernel_view
        if self.training:
            used = _step_used(noise)
            mean, invstd = self.ext.bn_forward_train(
                view(xc), lay.S, view(y), weight, bias, running_mean, running_var, momentum,
                eps, self.relu, *_noise_args(noise, xc.device), self.split, self.path)
            return lay.restore(y, x), mean, invstd, used
        self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_var, True, eps, weight,
                          bias, self.relu, *_noise_args(noise, xc.device))
        if not need_saved:
            return lay.restore(y, x), None, None, None
        acc = _acc(x.dtype)  # snapshots: the backward of this forward's statistics
        return (lay.restore(y, x), running_mean.to(acc, copy=True),
                torch.rsqrt(running_var.to(acc) + eps), None)

    def backward(self, dy, x, a, b, weight, bias, eps, needs, noise):
        need_dx, need_dw, need_db = needs
        lay = self.lay
        xc = lay.prepare(x)
        dx = torch.empty_like(xc) if need_dx else None
        view = lay.kernel_view
        dw, db = self.ext.bn_backward(
            view(lay.like(dy, xc)), view(xc), lay.S, view(dx) if need_dx else None, a, b,
            weight, bias, self.training, self.relu, bool(need_dw and weight is not None),
            bool(need_db and bias is not None), *_noise_args(noise, xc.device), self.split,
            self.path)
        return (lay.restore(dx, x) if need_dx else None), dw, db


class LpNormPlan:
    """One signature's l_p normalization calls (see :class:`BatchNormPlan`)."""

    def __init__(self, sig):
        self.ext = load()
        self.lay = layout_of(sig.shape, sig.stride, sig.device)
        self.training = sig.training
        self.p = float(sig.p)
        self.centered = bool(sig.centered)
        self.split = _split()
        self.sig = sig

    def forward(self, x, running_mean, running_scale, weight, bias, momentum, eps, noise=None,
                need_saved=True):
        if not self.training:
            y, _, _ = lp_norm_fwd(x, self.p, running_mean, running_scale, weight, bias, False,
                                  momentum, eps, self.centered)
            if not need_saved:
                return y, None, None, None
            acc = _acc(x.dtype)
            return y, running_mean.to(acc, copy=True), running_scale.to(acc, copy=True), None
        lay = self.lay
        xc = lay.prepare(x)
        y = torch.empty_like(xc)
        view = lay.kernel_view
        mean, scale = self.ext.lp_forward_train(
            view(xc), lay.S, view(y), self.p, self.centered, running_mean, running_scale,
            weight, bias, momentum, eps, self.split)
        return lay.restore(y, x), mean, scale, None

    def backward(self, dy, x, a, b, weight, bias, eps, needs, noise=None):
        return lp_norm_bwd(dy, x, self.p, a, b, weight, bias, self.training, self.centered, eps,
                           needs)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bnkernels.backends.cuda",
        description="Build or inspect bnkernels' CUDA extension (csrc/).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="JIT-compile the extension (needs nvcc and ninja, not a "
                                     "GPU) and print the path of the shared library")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    sub.add_parser("info", help="where the extension is cached and whether it can run here")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            path = build(verbose=args.verbose)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        print(path)
        return 0
    print(f"sources:      {cuda_build.CSRC} (hash {cuda_build.source_hash()})"
          if cuda_build.have_sources() else f"sources:      not found at {cuda_build.CSRC}")
    print(f"archs:        {cuda_build.arch_list()}")
    print(f"library:      {library_path()} ({'built' if library_path().exists() else 'absent'})")
    print(f"toolkit:      {_toolkit_problem() or 'ok'}")
    from .. import available_backends

    reasons = available_backends()["cuda"]
    print("cuda backend: " + ("available" if not reasons else "unavailable:\n  " +
                              "\n  ".join(reasons)))
    return 0
