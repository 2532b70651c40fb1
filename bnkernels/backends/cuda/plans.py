"""The CUDA C++ backend's plans: one signature's calls into the extension (:mod:`.loader`).

A plan resolves once the layout -- "ncs", (N, C, S) contiguous, or "mc", (N*S, C) contiguous
(channels last, or (N, C)) --, the training path, the split and the workspace; a call then views
its input without copying, allocates its outputs with the input's own strides, and makes one
call into the extension, which checks everything again and launches at most two kernels (three
for centered l_p's training forward). Inputs with other strides are copied to a contiguous
layout explicitly, never misread. No host synchronization: a noisy step given as a tensor is
read (and snapshotted for the backward) by the kernels.

The workspace (:class:`Workspaces`: per-channel coefficients, the split reductions' partials
and one ticket counter per channel group, which the last block of each group resets) is made
once per plan and CUDA stream, zeroed when made, and reused by every call.

BatchNorm training runs the persistent single-read kernels (csrc/persistent.cu) wherever the
tensor fits on chip, except while a CUDA graph is being captured, and the multi-pass kernels
otherwise. That default is not tuned by measurement yet (no GPU was at hand when it was
written). ``BNKERNELS_CUDA_PERSISTENT=0``: multi-pass only (read once, at import).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..layout import view_layout
from ..plan import BasePlan, acc_dtype, overriding
from ..plan import Workspaces as _Workspaces
from .loader import load

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
    wide = load().force_index64(bool(kwargs["index64"])) if "index64" in kwargs else None
    try:
        with overriding(_OVERRIDES, kwargs):
            yield
    finally:
        if wide is not None:
            load().force_index64(wide)


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


def _backward_io(lay, dy, x, need_dx: bool):
    """A training backward's dx (x's layout, None unless needed) and the kernels' first
    arguments: (dy, x, S, dx) as their kernel views."""
    xc = lay.prepare(x)
    dx = torch.empty_like(xc) if need_dx else None
    view = lay.kernel_view
    return dx, (view(lay.like(dy, xc)), view(xc), lay.S, view(dx) if need_dx else None)


class Workspaces(_Workspaces):
    """A plan's cached workspace (see :class:`bnkernels.backends.plan.Workspaces`; one per
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
        acc = acc_dtype(dtype)
        super().__init__(device, lambda: (
            torch.empty(n_acc, device=device, dtype=acc),
            torch.zeros(n_tickets, device=device, dtype=torch.int32)))



# ----------------------------------------------------------------------------- plans (hot path)


class BatchNormPlan(BasePlan):
    """One signature's BatchNorm calls: layout view, training path, split count and workspace
    resolved once (the extension is loaded when the plan is made); ``forward``/``backward``
    follow :class:`~..plan.Plan`, the stages :class:`~..plan.SyncStages`. Each method
    allocates its outputs and makes one call into the extension.

    Launches per call: training forward 1 (persistent, where x fits on chip) or 2 (split
    statistics finalized by the last block of each channel, then the apply); eval forward 1
    (invstd computed in the apply, which also snapshots the statistics for the backward);
    backward 1 (persistent, or eval dx alone) or 2."""

    def __init__(self, sig):
        lay, _ = self._resolve(sig)
        self.ext = load()
        self.relu = sig.activation == "relu"
        # A residual: the forward kernels add it before the activation; the backward masks dy
        # with the forward's output (d(residual)) and runs the kernels without the activation
        # on it (bn(x) + residual cannot be recomputed from x alone).
        self.res = sig.has_residual
        self.bwd_relu = self.relu and not self.res
        self.step_tensor = sig.step_tensor
        self.split = _split()
        self.path = _path()
        self.workspaces = Workspaces(self.ext, lay, sig.dtype, self.split)

    def _start(self, x, counter):
        """(layout, x as the kernels read it, y allocated like it); counts the batch (the
        extension's kernels leave the module's counter to the host)."""
        if counter is not None:
            counter.add_(1)
        xc = self.lay.prepare(x)
        return self.lay, xc, torch.empty_like(xc)

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        running_mean, running_var, _, momentum, eps, noise, counter = call
        lay, xc, y = self._start(x, counter)
        view = lay.kernel_view
        res = None if residual is None else view(lay.like(residual, xc))
        if self.training:
            used = (torch.empty(1, device=xc.device, dtype=torch.int64)
                    if self.step_tensor and noise is not None else None)
            ws, tickets = self.workspaces.get()
            mean, invstd = self.ext.bn_forward_train(
                view(xc), lay.S, view(y), weight, bias, running_mean, running_var, momentum,
                eps, self.relu, *_noise_args(noise, xc.device), used, ws, tickets, self.split,
                self.path, res)
            return lay.restore(y, x), mean, invstd, used
        if not need_saved:
            self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_var, _VAR, eps,
                              weight, bias, self.relu, *_noise_args(noise, xc.device), None,
                              None, res)
            return lay.restore(y, x), None, None, None
        # The apply snapshots the statistics it used: the backward is that of this forward,
        # whatever happens to the running buffers in between.
        mean = torch.empty(lay.C, device=xc.device, dtype=self.acc)
        invstd = torch.empty(lay.C, device=xc.device, dtype=self.acc)
        self.ext.bn_apply(view(xc), lay.S, view(y), running_mean, running_var, _VAR, eps,
                          weight, bias, self.relu, *_noise_args(noise, xc.device), mean, invstd,
                          res)
        return lay.restore(y, x), mean, invstd, None

    def backward(self, dy, x, weight, bias, saved, needs):
        """``saved``: the mean and invstd the forward saved, eps, the noise. With a residual,
        ``needs`` has a fourth entry, d(residual), ``saved.out`` is the forward's output (a
        ReLU's mask) and it returns ``(dx, dw, db, dresidual)``: d(residual) = dy where
        out > 0, else 0 (threshold_backward's mask, so a NaN output passes dy), or dy itself
        without the ReLU; the kernels then take it as the dy of bn(x), without the
        activation."""
        a, b, eps, noise, out = saved
        if self.res:
            g = dy.masked_fill(out <= 0, 0) if self.relu else dy
            if any(needs[:3]):
                dx, dw, db = self._backward(g, x, a, b, weight, bias, eps, needs[:3], noise)
            else:
                dx = dw = db = None
            return dx, dw, db, (g if needs[3] else None)
        return self._backward(dy, x, a, b, weight, bias, eps, needs, noise)

    def _backward(self, dy, x, a, b, weight, bias, eps, needs, noise):
        need_dx, need_dw, need_db = needs
        dx, args = _backward_io(self.lay, dy, x, need_dx)
        ws, tickets = self.workspaces.get()
        dw, db = self.ext.bn_backward(
            *args, a, b, _INVSTD, eps, weight, bias, self.training, self.bwd_relu,
            bool(need_dw and weight is not None), bool(need_db and bias is not None),
            *_noise_args(noise, x.device), ws, tickets, self.split, self.path)
        return (self.lay.restore(dx, x) if need_dx else None), dw, db

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
                          None, None)
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


class LpNormPlan(BasePlan):
    """One signature's l_p normalization calls (see :class:`BatchNormPlan`). Launches: training
    forward 2 (uncentered) or 3 (centered: the mean first), backward 2; eval forward 1
    (BatchNorm's apply, invstd = 1/(running_scale + eps) computed in it), eval backward
    BatchNorm's."""

    def __init__(self, sig):
        self.sig = sig
        self.bn = BatchNormPlan(sig._replace(op="batch_norm", activation=None, noisy=None,
                                             p=None, centered=None, counter=False))
        self.ext = self.bn.ext
        self.lay = self.bn.lay
        self.training = sig.training
        self.p = float(sig.p)
        self.centered = bool(sig.centered)
        self.workspaces = self.bn.workspaces

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_scale, _, momentum, eps, _, counter = call
        lay, xc, y = self.bn._start(x, counter)
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
                          weight, bias, False, *_NO_NOISE, *saved, None)
        return lay.restore(y, x), saved[0], saved[1], None

    def backward(self, dy, x, weight, bias, saved, needs):
        """``saved``: the forward's (mean, s_p) in training; in eval mode its snapshots
        (mean, invstd); then eps."""
        a, b, eps = saved[0], saved[1], saved[2]
        if not self.training:
            return self.bn._backward(dy, x, a, b, weight, bias, eps, needs, None)
        need_dx, need_dw, need_db = needs
        dx, args = _backward_io(self.lay, dy, x, need_dx)
        ws, tickets = self.workspaces.get()
        dw, db = self.ext.lp_backward_train(
            *args, self.p, self.centered, a, b, weight, bias, eps,
            bool(need_dw and weight is not None), bool(need_db and bias is not None), ws, tickets,
            self.bn.split)
        return (self.lay.restore(dx, x) if need_dx else None), dw, db


def noise_of(x, noise):
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




__all__ = ["BatchNormPlan", "LpNormPlan", "Workspaces", "noise_of", "override_config",
           "persistent_plan"]
