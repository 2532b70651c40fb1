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

Calls go through per-signature plans (:class:`BatchNormPlan`, :class:`LpNormPlan`; the entry
points below mirror :mod:`bnkernels.backends.triton`'s, with the same signatures and return
conventions, see :class:`bnkernels.backends._base.Backend`, and run on cached plans too). A plan
resolves once the layout -- "ncs", (N, C, S) contiguous, or "mc", (N*S, C) contiguous (channels
last, or (N, C)) --, the training path, the split and the workspace; a call then views its
input without copying, allocates its outputs with the input's own strides, and makes one call
into the extension, which checks everything again and launches at most two kernels (three for
centered l_p's training forward). Inputs with other strides are copied to a contiguous layout
explicitly, never misread. No host synchronization: a noisy step given as a tensor is read (and
snapshotted for the backward) by the kernels.

The workspace (:class:`Workspaces`: per-channel coefficients, the split reductions' partials
and one ticket counter per channel group, which the last block of each group resets) is made
once per plan and CUDA stream, zeroed when made, and reused by every call.

BatchNorm training runs the persistent single-read kernels (csrc/persistent.cu) wherever the
tensor fits on chip, except while a CUDA graph is being captured, and the multi-pass kernels
otherwise. That default is not tuned by measurement yet (no GPU was at hand when it was written).

Environment: ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs', else "8.0;9.0"),
``NVCC_THREADS`` and ``MAX_JOBS`` (build parallelism), ``XDG_CACHE_HOME`` (cache),
``BNKERNELS_SKIP_CUDA_BUILD=1`` (never JIT-build), ``BNKERNELS_CUDA_PERSISTENT=0`` (multi-pass
only; read once, at import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from .. import _base
from .._base import Signature, bounded_cache_put
from ..layout import layout_of, view_layout
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
# heuristic), "path" ("auto", "multipass" or "persistent" for the BatchNorm training kernels;
# "persistent" raises where it cannot run) and "index64" (64-bit index arithmetic on every
# size, so that the wide path runs on small tensors).
_OVERRIDES: dict = {}
_PATHS = {"auto": 0, "multipass": 1, "persistent": 2}


@contextlib.contextmanager
def override_config(**kwargs):
    """Force launch parameters: ``split=int``, ``path="auto"|"multipass"|"persistent"``,
    ``index64=bool``."""
    unknown = set(kwargs) - {"split", "path", "index64"}
    if unknown:
        raise ValueError(f"unknown launch overrides {sorted(unknown)}")
    if "path" in kwargs and kwargs["path"] not in _PATHS:
        raise ValueError(f"path must be one of {list(_PATHS)}, got {kwargs['path']!r}")
    from .. import clear_plans

    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    wide = load().force_index64(bool(kwargs["index64"])) if "index64" in kwargs else None
    clear_plans()
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)
        if wide is not None:
            load().force_index64(wide)
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


# ----------------------------------------------------------------------------- helpers


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noise_args(noise, device: torch.device) -> tuple:
    """(config list or None, seed, step, step tensor or None) for the extension."""
    if noise is None:
        return _NO_NOISE
    cfg, seed, step = noise
    values = [float(cfg.n_mu), float(cfg.n_sigma), float(cfg.r_mu), float(cfg.r_sigma)]
    if isinstance(step, torch.Tensor):
        step_t = step.reshape(1)
        if step_t.dtype != torch.int64:
            step_t = step_t.to(torch.int64)  # on the device: no synchronization
        return values, int(seed), 0, step_t.to(device)
    return values, int(seed), int(step) & 0xFFFFFFFF, None


_NO_NOISE = (None, 0, 0, None)

# What the "second" per-channel statistic handed to the extension holds (csrc ScaleFrom).
_INVSTD, _VAR, _LP_SCALE = 0, 1, 2


class Workspaces(_base.Workspaces):
    """A plan's cached workspace (see :class:`bnkernels.backends._base.Workspaces`; one per
    CUDA stream, one on the CPU where the tests' emulated kernels run): ``(acc, tickets)``.

    ``acc`` (the accumulation dtype) holds the per-channel coefficients and the partials of
    the split reductions; ``tickets`` (int32) one counter per channel group, which the last
    block of each group resets. Sizes come from the extension (``workspace_size``: every
    vector width a call of the signature may get), so every call of the plan fits."""

    def __init__(self, ext, lay, dtype: torch.dtype, split: int):
        device = lay.device
        index = 0
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
        n_acc, n_tickets = ext.workspace_size(lay.N, lay.C, lay.S, lay.kind == "ncs",
                                              dtype.itemsize, split, index)
        acc = _acc(dtype)
        super().__init__(device, lambda: (
            torch.empty(n_acc, device=device, dtype=acc),
            torch.zeros(n_tickets, device=device, dtype=torch.int32)))


# ----------------------------------------------------------------------------- plans (hot path)


class BatchNormPlan:
    """One signature's BatchNorm calls: layout view, training path, split count and workspace
    resolved once (the extension is loaded when the plan is made); ``forward``/``backward``
    follow :class:`bnkernels.backends._base.Backend`, the other methods serve the entry points
    (SyncBatchNorm's stages). Each method allocates its outputs and makes one call into the
    extension.

    Launches per call: training forward 1 (persistent, where x fits on chip) or 2 (split
    statistics finalized by the last block of each channel, then the apply); eval forward 1
    (invstd computed in the apply, which also snapshots the statistics for the backward);
    backward 1 (persistent, or eval dx alone) or 2."""

    def __init__(self, sig):
        self.ext = load()
        self.lay = lay = layout_of(sig.shape, sig.stride, sig.device)
        self.acc = _acc(sig.dtype)
        self.training = sig.training
        self.relu = sig.activation == "relu"
        self.step_tensor = bool(sig.noisy and sig.step_tensor)
        self.split = _split()
        self.path = _path()
        self.workspaces = Workspaces(self.ext, lay, sig.dtype, self.split)

    def forward(self, x, running_mean, running_var, weight, bias, momentum, eps, noise,
                need_saved=True):
        lay = self.lay
        xc = lay.prepare(x)
        y = torch.empty_like(xc)
        view = lay.kernel_view
        if self.training:
            used = (torch.empty(1, device=xc.device, dtype=torch.int64)
                    if self.step_tensor and noise is not None else None)
            ws, tickets = self.workspaces.get()
            mean, invstd = self.ext.bn_forward_train(
                view(xc), lay.S, view(y), weight, bias, running_mean, running_var, momentum,
                eps, self.relu, *_noise_args(noise, xc.device), used, ws, tickets, self.split,
                self.path)
            return lay.restore(y, x), mean, invstd, used
        if not need_saved:
            self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_var, _VAR, eps,
                              weight, bias, self.relu, *_noise_args(noise, xc.device), None,
                              None)
            return lay.restore(y, x), None, None, None
        # The apply snapshots the statistics it used: the backward is that of this forward,
        # whatever happens to the running buffers in between.
        mean = torch.empty(lay.C, device=xc.device, dtype=self.acc)
        invstd = torch.empty(lay.C, device=xc.device, dtype=self.acc)
        self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_var, _VAR, eps,
                          weight, bias, self.relu, *_noise_args(noise, xc.device), mean, invstd)
        return lay.restore(y, x), mean, invstd, None

    def backward(self, dy, x, a, b, weight, bias, eps, needs, noise, scale_from=_INVSTD):
        """``a, b``: the mean and invstd the forward saved (or, with ``scale_from``, the
        variance or l_p scale the invstd is made from, in eval mode)."""
        need_dx, need_dw, need_db = needs
        lay = self.lay
        xc = lay.prepare(x)
        dx = torch.empty_like(xc) if need_dx else None
        view = lay.kernel_view
        ws, tickets = self.workspaces.get()
        dw, db = self.ext.bn_backward(
            view(lay.like(dy, xc)), view(xc), lay.S, view(dx) if need_dx else None, a, b,
            scale_from, eps, weight, bias, self.training, self.relu,
            bool(need_dw and weight is not None), bool(need_db and bias is not None),
            *_noise_args(noise, xc.device), ws, tickets, self.split, self.path)
        return (lay.restore(dx, x) if need_dx else None), dw, db

    # -- SyncBatchNorm's stages

    def stats(self, x):
        lay = self.lay
        ws, tickets = self.workspaces.get()
        return self.ext.bn_stats(lay.kernel_view(lay.prepare(x)), lay.S, ws, tickets, self.split)

    def apply(self, x, mean, invstd, weight, bias, noise):
        lay = self.lay
        xc = lay.prepare(x)
        y = torch.empty_like(xc)
        self.ext.bn_apply(lay.kernel_view(xc), lay.S, lay.kernel_view(y), mean, invstd, _INVSTD,
                          0.0, weight, bias, self.relu, *_noise_args(noise, xc.device), None,
                          None)
        return lay.restore(y, x)

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise):
        lay = self.lay
        xc = lay.prepare(x)
        ws, tickets = self.workspaces.get()
        return self.ext.bn_bwd_reduce(
            lay.kernel_view(lay.like(dy, xc)), lay.kernel_view(xc), lay.S, mean, invstd, weight,
            bias, self.relu, *_noise_args(noise, xc.device), ws, tickets, self.split)

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise):
        lay = self.lay
        xc = lay.prepare(x)
        dx = torch.empty_like(xc)
        view = lay.kernel_view
        self.ext.bn_bwd_dx(view(lay.like(dy, xc)), view(xc), lay.S, view(dx), mean, invstd,
                           weight, bias, mean_sums, self.relu, *_noise_args(noise, xc.device))
        return lay.restore(dx, x)


class LpNormPlan:
    """One signature's l_p normalization calls (see :class:`BatchNormPlan`). Launches: training
    forward 2 (uncentered) or 3 (centered: the mean first), backward 2; eval forward 1
    (BatchNorm's apply, invstd = 1/(running_scale + eps) computed in it), eval backward
    BatchNorm's."""

    def __init__(self, sig):
        self.bn = BatchNormPlan(dataclasses.replace(sig, activation=None, noisy=False,
                                                    step_tensor=False))
        self.ext = self.bn.ext
        self.lay = self.bn.lay
        self.training = sig.training
        self.p = float(sig.p)
        self.centered = bool(sig.centered)
        self.workspaces = self.bn.workspaces

    def forward(self, x, running_mean, running_scale, weight, bias, momentum, eps, noise=None,
                need_saved=True):
        lay = self.lay
        xc = lay.prepare(x)
        y = torch.empty_like(xc)
        view = lay.kernel_view
        if self.training:
            ws, tickets = self.workspaces.get()
            mean, scale = self.ext.lp_forward_train(
                view(xc), lay.S, view(y), self.p, self.centered, running_mean, running_scale,
                weight, bias, momentum, eps, ws, tickets, self.bn.split)
            return lay.restore(y, x), mean, scale, None
        saved = (None, None)
        if need_saved:  # snapshots: the mean and 1/(running_scale + eps) used
            saved = (torch.empty(lay.C, device=xc.device, dtype=self.bn.acc),
                     torch.empty(lay.C, device=xc.device, dtype=self.bn.acc))
        self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_scale, _LP_SCALE, eps,
                          weight, bias, False, *_NO_NOISE, *saved)
        return lay.restore(y, x), saved[0], saved[1], None

    def backward(self, dy, x, a, b, weight, bias, eps, needs, noise=None, scale_from=_INVSTD):
        """``a, b``: the forward's saved (mean, s_p) in training; in eval mode its snapshots
        (mean, invstd), or with ``scale_from`` the running scale itself."""
        if not self.training:
            return self.bn.backward(dy, x, a, b, weight, bias, eps, needs, None, scale_from)
        need_dx, need_dw, need_db = needs
        lay = self.lay
        xc = lay.prepare(x)
        dx = torch.empty_like(xc) if need_dx else None
        view = lay.kernel_view
        ws, tickets = self.workspaces.get()
        dw, db = self.ext.lp_backward_train(
            view(lay.like(dy, xc)), view(xc), lay.S, view(dx) if need_dx else None, self.p,
            self.centered, a, b, weight, bias, eps, bool(need_dw and weight is not None),
            bool(need_db and bias is not None), ws, tickets, self.bn.split)
        return (lay.restore(dx, x) if need_dx else None), dw, db


# The entry points' plans (the eager route caches its own), keyed by signature and family;
# cleared with every other plan cache (registered when the first plan is made: the backend
# registry imports this module before it can take registrations).
_PLANS: dict = {}


def _new_plan(key, make):
    from .. import _plan_caches, register_plan_cache

    if not any(cache is _PLANS for cache in _plan_caches):
        register_plan_cache(_PLANS)
    return bounded_cache_put(_PLANS, key, make())


def batch_norm_plan(sig: Signature) -> BatchNormPlan:
    """The cached plan of ``sig``."""
    plan = _PLANS.get(("bn", sig))
    return plan if plan is not None else _new_plan(("bn", sig), lambda: BatchNormPlan(sig))


def lp_norm_plan(sig: Signature) -> LpNormPlan:
    """The cached plan of ``sig``."""
    plan = _PLANS.get(("lp", sig))
    return plan if plan is not None else _new_plan(("lp", sig), lambda: LpNormPlan(sig))


def _bn_plan_for(x, training, activation=None, noise=None):
    return batch_norm_plan(Signature.of(
        x, bool(training), activation=activation, noisy=noise is not None,
        step_tensor=noise is not None and isinstance(noise[2], torch.Tensor)))


def _lp_plan_for(x, p, training, centered):
    return lp_norm_plan(Signature.of(x, bool(training), p=float(p), centered=bool(centered)))


# ----------------------------------------------------------------------------- entry points
# The same signatures as every backend's (see bnkernels.backends._base.Backend), on the cached
# plans above.


def batch_norm_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, noise=None):
    """Forward BatchNorm; ``(y, save_mean, save_invstd)``, ``(y, None, None)`` in eval mode.

    Training: the batch mean and 1/sqrt(biased var + eps) in fp32 (fp64 for fp64 x), running
    buffers updated in place on the device; one persistent cooperative kernel where x fits on
    chip (x read once), else statistics + apply. Eval: the running statistics, one launch."""
    plan = _bn_plan_for(x, training, activation, noise)
    y, mean, invstd, _ = plan.forward(x, running_mean, running_var, weight, bias,
                                      float(momentum), float(eps), noise, need_saved=False)
    return y, mean, invstd


def batch_norm_stats(x):
    """Per-channel (mean, biased var), fp32/fp64 (SyncBatchNorm's first stage)."""
    return _bn_plan_for(x, True).stats(x)


def batch_norm_apply(x, mean, invstd, weight, bias, activation, noise=None):
    """y = act(w * (x - mean) * invstd + b) with given per-channel statistics."""
    return _bn_plan_for(x, True, activation, noise).apply(x, mean, invstd, weight, bias, noise)


def batch_norm_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs, noise=None):
    """Backward BatchNorm; ``(dx, dweight, dbias)``, None where ``needs`` says so.

    ``mean``/``invstd`` are the saved batch statistics in training, and running_mean and
    1/sqrt(running_var + eps) in eval mode; the noise is regenerated, not stored."""
    return _bn_plan_for(x, training, activation, noise).backward(
        dy, x, mean, invstd, weight, bias, 0.0, needs, noise)


def batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None):
    """[sum(g), sum(g * (x - mean))] per channel ([2, C]) for SyncBatchNorm."""
    return _bn_plan_for(x, True, activation, noise).bwd_reduce(dy, x, mean, invstd, weight,
                                                                bias, noise)


def batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums, activation, noise=None):
    """Training dx given ``mean_sums`` = [mean(g), mean(g * (x - mean))] over the whole batch."""
    return _bn_plan_for(x, True, activation, noise).bwd_dx(dy, x, mean, invstd, weight, bias,
                                                            mean_sums, noise)


def noisy_batch_norm_noise(x, noise):
    """The (s, m) noise (fp32, x's shape, contiguous) that noisy BatchNorm applies to ``x``."""
    lay = view_layout(x)
    cfg, seed, step, step_t = _noise_args(noise, x.device)
    s, m = load().noisy_bn_noise(lay.kernel_view(lay.prepare(x)), lay.S, cfg, seed, step,
                                 step_t)
    return s.view(x.shape), m.view(x.shape)


def persistent_plan(x, backward: bool = False) -> dict:
    """Whether the persistent single-read kernel takes ``x`` (runs nothing): fits, why not,
    blocks, blocks per channel (or channel group)."""
    lay = view_layout(x)
    fits, why, blocks, per = load().persistent_plan(lay.kernel_view(lay.prepare(x)), lay.S,
                                                    backward)
    return {"fits": fits, "why": why, "blocks": blocks, "per_channel": per}


def lp_norm_fwd(x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                centered):
    """Forward l_p normalization; ``(y, save_mean, save_scale)`` (s_p itself, not
    1/(s_p + eps)), ``(y, None, None)`` in eval mode."""
    plan = _lp_plan_for(x, p, training, centered)
    y, mean, scale, _ = plan.forward(x, running_mean, running_scale, weight, bias,
                                     float(momentum), float(eps), need_saved=False)
    return y, mean, scale


def lp_norm_bwd(dy, x, p, mean, scale, weight, bias, training, centered, eps, needs):
    """Backward l_p normalization; ``(dx, dweight, dbias)``, None where ``needs`` says so.

    Eval: running_mean and running_scale are constants, so this is BatchNorm's eval backward
    with invstd = 1/(running_scale + eps) (computed in the kernel)."""
    return _lp_plan_for(x, p, training, centered).backward(
        dy, x, mean, scale, weight, bias, float(eps), needs, None, _LP_SCALE)


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
