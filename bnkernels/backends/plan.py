"""Plans, the signature they are made for, and the one cache that holds them.

A **plan** is everything about an op call that depends only on its :class:`Signature`,
resolved once by a backend: the layout view, the strategy, grids, blocks, warps, constexprs,
a cached workspace, pre-bound launches. Its methods then allocate the outputs and launch,
with nothing left to decide. Every backend's plans follow :class:`Plan` (BatchNorm plans also
:class:`SyncStages`, the stages SyncBatchNorm runs between its collectives).

:data:`PLANS` maps a signature to its plan; :func:`bnkernels.backends.make_plan` fills it (it
validates nothing: :mod:`bnkernels.functional` validates a signature before its first plan is
made). ``PLANS.clear()`` (called by ``set_backend`` and the launch-parameter overrides) makes
every signature select and plan again.

This module imports nothing else from bnkernels: the backends import it, never the registry.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Protocol

import torch

from .layout import layout_of

# Input dtypes every backend takes (fp64 mainly for gradcheck).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Signature(NamedTuple):
    """Everything about a call that a plan may depend on.

    The input's shape, strides, dtype and device; the call's flags; and ``channels``: for each
    per-channel tensor (weight, bias, running mean, running var/scale) None when absent, else
    its (dtype, device, number of elements, contiguity). Values that change from call to call
    (the tensors themselves, momentum, eps, the noise seed and step) are not part of it.
    ``backend`` is None when the selection picks the backend (eager calls), else the backend's
    name (the registered ops, whose graph fixed it when traced).

    A plain tuple underneath: the hot path builds one per call with ``tuple.__new__`` (no
    NamedTuple constructor) and hashes it as a tuple.
    """

    op: str  # "batch_norm" (noisy included) or "lp_norm"
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    training: bool
    activation: str | None  # None or "relu"
    noisy: tuple | None  # noisy BatchNorm: (NoiseConfig, step); else None. step: None for an
    # int step, else the step tensor's (dtype, device, numel)
    p: float | None  # l_p: 1, 2 or inf
    centered: bool | None  # l_p: the scale of x - mean
    counter: bool  # a module's num_batches_tracked comes along, to be incremented
    channels: tuple  # entries of weight, bias, running mean, running var/scale (see channels)
    residual: tuple | None = None  # BatchNorm with a residual: its (dtype, device, shape)
    backend: str | None = None

    @staticmethod
    def channels_of(weight, bias, running_mean, running_var) -> tuple:
        """The ``channels`` entry: per tensor, None or (dtype, device, numel, contiguity)."""
        return (
            None if weight is None else (weight.dtype, weight.device, weight.numel(),
                                         weight.is_contiguous()),
            None if bias is None else (bias.dtype, bias.device, bias.numel(),
                                       bias.is_contiguous()),
            None if running_mean is None else (running_mean.dtype, running_mean.device,
                                               running_mean.numel(), running_mean.is_contiguous()),
            None if running_var is None else (running_var.dtype, running_var.device,
                                              running_var.numel(), running_var.is_contiguous()))

    @classmethod
    def of(cls, op: str, x: torch.Tensor, training: bool, *, activation=None, noise=None,
           p=None, centered=None, counter=False, weight=None, bias=None, running_mean=None,
           running_var=None, residual=None, backend: str | None = None) -> Signature:
        """The signature of a call, by keyword (the hot path calls :func:`signature` with
        the same values). ``noise``: None or (NoiseConfig, seed, step)."""
        noisy = None if noise is None else (noise[0], step_entry(noise[2]))
        return signature(op, x, bool(training), activation, noisy, p, centered, bool(counter),
                         cls.channels_of(weight, bias, running_mean, running_var),
                         cls.residual_of(residual), backend)

    @staticmethod
    def residual_of(residual) -> tuple | None:
        """The ``residual`` entry: None, or the residual's (dtype, device, shape); its strides
        are not part of it (a plan copies a residual strided unlike x to x's layout)."""
        return None if residual is None else (residual.dtype, residual.device, residual.shape)

    # -- readable views of the fields

    @property
    def has_weight(self) -> bool:
        return self.channels[0] is not None

    @property
    def has_bias(self) -> bool:
        return self.channels[1] is not None

    @property
    def has_running(self) -> bool:
        return self.channels[2] is not None

    @property
    def has_residual(self) -> bool:
        return self.residual is not None

    @property
    def is_noisy(self) -> bool:
        return self.noisy is not None

    @property
    def step_tensor(self) -> bool:
        return self.noisy is not None and self.noisy[1] is not None

    @property
    def channels_contiguous(self) -> bool:
        return all(c is None or c[3] for c in self.channels)


_new = tuple.__new__


def signature(op, x, training, activation, noisy, p, centered, counter, channels,
              residual=None, backend=None):
    """The one spelling of a call's :class:`Signature` (positional: the hot path calls it per
    call; ``tuple.__new__`` skips NamedTuple's constructor)."""
    return _new(Signature, (op, x.shape, x.stride(), x.dtype, x.device, training, activation,
                            noisy, p, centered, counter, channels, residual, backend))


def step_entry(step):
    """The signature's entry of a noise step: None for an int, (dtype, device, numel) for a
    tensor (read on the device)."""
    return (step.dtype, step.device, step.numel()) if isinstance(step, torch.Tensor) else None


class Call(NamedTuple):
    """A forward's per-call state: what a plan's ``forward`` takes besides x, weight, bias
    (and a residual). The values that change from call to call; the plan holds the rest.

    The eager hot path passes its fields in this order as a plain tuple (nothing built per
    call for the structure); the traced routes and the registered ops build a Call."""

    running_mean: Any  # Tensor or None
    running_var: Any  # the family's second running buffer (l_p: running_scale), or None
    plan: Any  # the call's Plan (what :class:`~bnkernels.autograd.NormFunction` runs); a plan
    #            given a Call ignores this field
    momentum: float
    eps: float
    noise: Any  # None, or (NoiseConfig, seed, step) for noisy BatchNorm
    counter: Any  # a module's num_batches_tracked (incremented by the forward), or None


class Saved(NamedTuple):
    """What a forward keeps for its backward: a plan's ``backward`` takes it besides dy, x,
    weight and bias (:class:`~bnkernels.autograd.NormFunction` builds it from the forward's
    result; the registered backward ops from their arguments)."""

    a: Any  # the forward's first saved statistic (BatchNorm, l_p: the mean)
    b: Any  # its second (BatchNorm: 1/sqrt(var + eps); l_p: s_p; eval: the snapshots)
    eps: float
    noise: Any  # None, or (NoiseConfig, seed, step) with the step the forward used
    out: Any = None  # the forward's output where the backward reads it (a ReLU fused after a
    #                  residual add: its mask), else None


class Plan(Protocol):
    """The calls of one signature (every backend, every op family).

    ``forward(x, weight, bias, call, need_saved=True, residual=None) -> (y, saved_a, saved_b,
    step_used)``; ``call``: a :class:`Call` (or the plain tuple of its fields). It updates the
    running buffers in training (``running_var`` is the running scale for l_p). ``saved_a,
    saved_b`` are what this plan's backward takes (:class:`Saved` ``a`` and ``b``): the batch
    mean and 1/sqrt(var + eps) (l_p: the mean and s_p) in training; in eval, snapshots of the
    statistics this forward used, so the backward is that of this forward whatever happens to
    the running buffers in between. Both None when ``need_saved`` is False (no backward will
    come). ``step_used``: the noise step the forward used when it was given as a tensor (a
    1-element int64 tensor, the one form on every backend), else None; it becomes the step of
    :class:`Saved` ``noise``. ``call.counter``: a module's ``num_batches_tracked``,
    incremented by this call (training with running statistics).

    ``backward(dy, x, weight, bias, saved, needs) -> (dx, dw, db)``; ``saved``: a
    :class:`Saved` (or the plain tuple of its fields). None where ``needs`` (3 booleans) says
    a gradient is not wanted.

    BatchNorm with a residual (``sig.residual``): ``forward(..., residual)`` computes
    out = act(bn(x) + residual) (noisy: act(s * a + m + residual)); ``backward`` reads
    ``saved.out``, the forward's output (where a fused ReLU was active: out > 0, as torch's
    threshold_backward reads it), ``needs`` has a fourth boolean, d(residual), and it returns
    ``(dx, dw, db, dresidual)``: d(residual) is the activation-masked dy (dy itself without
    an activation), written by the pass that writes dx.

    ``noise`` is None, or ``(NoiseConfig, seed, step)`` for noisy BatchNorm.

    ``sig``: the :class:`Signature` the plan was made for (the double backward reads the call's
    flags there).
    """

    sig: Signature

    def forward(self, x, weight, bias, call, need_saved=True, residual=None): ...

    def backward(self, dy, x, weight, bias, saved, needs): ...


class BasePlan:
    """What most plans share: the fields resolved from the signature alone (``_resolve``)."""

    def _resolve(self, sig: Signature):
        """``sig``, the input's layout view ``lay``, the accumulation dtype ``acc``, ``C``,
        ``training`` and ``copy`` (the input is copied to the kernels' layout); gives
        (lay, acc)."""
        self.sig = sig
        self.lay = lay = layout_of(sig.shape, sig.stride, sig.device)
        self.acc = acc = acc_dtype(sig.dtype)
        self.C = lay.C
        self.training = sig.training
        self.copy = lay.copy
        return lay, acc


class SyncStages(Protocol):
    """The stages of a training BatchNorm call that SyncBatchNorm runs between its
    collectives (BatchNorm plans of every backend; statistics in the accumulation dtype).

    ``stats(x) -> (mean, biased var)``; ``apply(x, mean, invstd, weight, bias, noise) -> y``;
    ``bwd_reduce(dy, x, mean, invstd, weight, bias, noise) -> [2, C]`` (sum(g),
    sum(g (x - mean))); ``bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums, noise) -> dx``
    with ``mean_sums`` = [mean(g), mean(g (x - mean))] over the whole (multi-process) batch.
    """

    def stats(self, x): ...

    def apply(self, x, mean, invstd, weight, bias, noise): ...

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise): ...

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise): ...


class PlanCache(dict):
    """Signature -> plan, bounded: a program that feeds ever new shapes does not grow memory
    without end (the oldest plan is dropped past ``limit``)."""

    limit = 4096

    def put(self, sig: Signature, plan):
        if len(self) >= self.limit:
            self.pop(next(iter(self)))
        self[sig] = plan
        return plan


PLANS = PlanCache()  # the one plan cache (see the module docstring)


@contextlib.contextmanager
def overriding(overrides: dict, values: dict):
    """A backend's launch-parameter overrides (tests, experiments with the heuristics): set
    ``values`` in its ``overrides`` dict for the block; plans made before or inside it are
    forgotten on entry and exit (they were made with other values)."""
    old = dict(overrides)
    overrides.update(values)
    PLANS.clear()
    try:
        yield
    finally:
        overrides.clear()
        overrides.update(old)
        PLANS.clear()


def _raw_stream_getter():
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is None:  # pragma: no cover - every CUDA build of torch >= 2.4 has it
        return lambda index: torch.cuda.current_stream(index).cuda_stream
    return getter


def _never() -> bool:
    return False


def _capture_check(device: torch.device):
    """A function telling whether the current stream is capturing a CUDA graph (per call)."""
    return torch.cuda.is_current_stream_capturing if device.type == "cuda" else _never


# Workspaces made inside CUDA graph captures: the graphs write them at every replay, and
# nothing tells when a graph is destroyed, so they are held for the life of the process
# (never freed by PLANS.clear() or eviction; a few KB to a few MB per captured call).
GRAPH_WORKSPACES: list = []


class Workspaces:
    """The cached workspace of a plan: one per CUDA stream it runs on (one on the CPU), made
    by ``make()`` on first use and reused by every later eager call on that stream.

    A split reduction's workspace holds its partials and one ticket counter per channel group;
    the last program (block) of a group resets its counter, so a workspace is zeroed once, when
    made (``make`` zeroes the tickets). Eager calls on one stream are ordered, so they can
    share it; calls on two streams at once get two workspaces.

    A call made while its stream captures a CUDA graph gets a workspace of its own, made (and
    zero-filled) inside the capture: the graph owns it alone (two graphs, or a graph and eager
    calls, never share partials or tickets, so concurrent replays do not race), the zero-fill
    is part of the graph (run before the kernels at every replay, so a ticket left part-way by
    an interrupted replay is reset by the next), and it is held in :data:`GRAPH_WORKSPACES`
    (a later ``PLANS.clear()`` or eviction cannot free memory a replay writes)."""

    def __init__(self, device: torch.device, make):
        self._make = make
        self._by_stream: dict = {}
        self._capturing = _capture_check(device)
        if device.type == "cuda":
            getter = _raw_stream_getter()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._stream = lambda: getter(index)
        else:
            self._stream = lambda: 0

    def get(self):
        if self._capturing():
            ws = self._make()
            GRAPH_WORKSPACES.append(ws)
            return ws
        key = self._stream()
        ws = self._by_stream.get(key)
        if ws is None:
            ws = self._by_stream[key] = self._make()
        return ws


class ContiguousChannels(BasePlan):
    """A plan for per-channel tensors that are not contiguous (a view such as ``w[::2]``; the
    kernels read them as contiguous vectors): contiguous copies go in, and updated running
    buffers are copied back. Rare, so it stays off the common path."""

    def __init__(self, plan):
        self.plan = plan
        self.sig = plan.sig

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        running_mean, running_var = call[0], call[1]
        c = [t if t is None else t.contiguous() for t in (running_mean, running_var)]
        out = self.plan.forward(x, _contiguous(weight), _contiguous(bias),
                                (c[0], c[1], *call[2:]), need_saved, residual)
        for orig, copy in zip((running_mean, running_var), c):
            if orig is not None and copy is not orig:
                orig.copy_(copy)
        return out

    def backward(self, dy, x, weight, bias, saved, needs):
        return self.plan.backward(dy, x, _contiguous(weight), _contiguous(bias),
                                  (saved[0].contiguous(), saved[1].contiguous(), *saved[2:]),
                                  needs)

    # SyncBatchNorm's stages (BatchNorm plans)

    def stats(self, x):
        return self.plan.stats(x)

    def apply(self, x, mean, invstd, weight, bias, noise):
        return self.plan.apply(x, mean, invstd, _contiguous(weight), _contiguous(bias), noise)

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise):
        return self.plan.bwd_reduce(dy, x, mean, invstd, _contiguous(weight),
                                    _contiguous(bias), noise)

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise):
        return self.plan.bwd_dx(dy, x, mean, invstd, _contiguous(weight), _contiguous(bias),
                                mean_sums, noise)


def _contiguous(t):
    return t if t is None else t.contiguous()


__all__ = ["FLOAT_DTYPES", "PLANS", "BasePlan", "Call", "ContiguousChannels", "Plan",
           "PlanCache", "Saved", "Signature", "SyncStages", "Workspaces", "acc_dtype",
           "overriding", "signature", "step_entry"]
