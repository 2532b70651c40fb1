"""The interface every backend implements, and the input signature plans are made for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Input dtypes every backend is expected to take (fp64 mainly for gradcheck).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Signature:
    """Everything about a call that a plan may depend on: the input's shape, strides, dtype
    and device, and the call's flags. Values that change from call to call (the tensors
    themselves, momentum, eps, the noise seed and step) are not part of it."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    training: bool
    activation: str | None = None
    has_weight: bool = True
    has_bias: bool = True
    has_running: bool = True  # running statistics given (updated in training)
    noisy: bool = False  # noisy BatchNorm (Algorithm 1)
    step_tensor: bool = False  # the noise step is a device tensor (else an int)
    p: float = 2.0  # l_p norm: 1, 2 or inf
    centered: bool = False  # l_p norm: the scale of x - mean

    @staticmethod
    def of(x: torch.Tensor, training: bool, **flags) -> Signature:
        return Signature(tuple(x.shape), tuple(x.stride()), x.dtype, x.device, training,
                         **flags)


class Backend:
    """A set of kernels for every op, with the reasons it cannot take a given input.

    Plans (the hot path; made once per :class:`Signature` and cached by the caller):

    * ``batch_norm_plan(sig)`` -> an object with
      ``forward(x, running_mean, running_var, weight, bias, momentum, eps, noise,
      need_saved=True) -> (y, save_a, save_b, step_used)`` and
      ``backward(dy, x, save_a, save_b, weight, bias, eps, needs, noise) -> (dx, dw, db)``.
      ``save_a, save_b`` are what that plan's backward needs: the batch mean and
      1/sqrt(var + eps) in training, snapshots of the statistics the forward used in eval
      mode (None when ``need_saved`` is False: no backward will come). ``step_used`` is the
      noise step the forward used (a 1-element int64 tensor) when the step was given as a
      tensor, else None.
    * ``lp_norm_plan(sig)`` -> the same shape of object (saved: mean and s_p in training).

    Entry points (same signatures in every backend; used by the registered torch ops, which
    torch.compile and opcheck see):

    * ``batch_norm_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
      activation, noise=None) -> (y, save_mean, save_invstd)``; (y, None, None) in eval mode.
    * ``batch_norm_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs,
      noise=None) -> (dx, dweight, dbias)``.
    * ``noisy_batch_norm_noise(x, noise) -> (s, m)``, the noise applied to ``x``.
    * stages for SyncBatchNorm: ``batch_norm_stats(x) -> (mean, var)``,
      ``batch_norm_apply(x, mean, invstd, weight, bias, activation, noise=None) -> y``,
      ``batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None)
      -> [sum(g), sum(g (x - mean))]``, ``batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias,
      mean_sums, activation, noise=None) -> dx``.
    * ``lp_norm_fwd`` / ``lp_norm_bwd``: see :mod:`bnkernels.backends.reference`.

    ``noise`` is ``(NoiseConfig, seed, step)`` for noisy BatchNorm, None for plain BatchNorm.
    """

    name: str = ""

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this machine (empty: it can)."""
        return []

    def not_supported_reasons(self, op: str, x: torch.Tensor, **inputs) -> list[str]:
        """Why this backend cannot run ``op`` on these inputs (empty: it can)."""
        return []

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"


def bounded_cache_put(cache: dict, key, value, limit: int = 4096):
    """``cache[key] = value``, dropping the oldest entry past ``limit`` (plans per signature:
    a program that feeds ever new shapes must not grow memory without bound)."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def cached_plan(cache: dict, sig: Signature, make):
    """``cache[sig]``, made by ``make(sig)`` on first use (bounded, see bounded_cache_put)."""
    plan = cache.get(sig)
    if plan is None:
        plan = bounded_cache_put(cache, sig, make(sig))
    return plan


def _raw_stream_getter():
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is None:  # pragma: no cover - every CUDA build of torch >= 2.4 has it
        return lambda index: torch.cuda.current_stream(index).cuda_stream
    return getter


class Workspaces:
    """The cached workspace of a plan: one per CUDA stream it runs on (one on the CPU), made
    by ``make()`` on first use and reused by every later call on that stream.

    A split reduction's workspace holds its partials and one ticket counter per channel group;
    the last program (block) of a group resets its counter, so a workspace is zeroed once, when
    made. Calls on one stream are ordered, so they can share it; calls on two streams at once
    get two workspaces. (A CUDA graph captured on a side stream keeps that stream's workspace;
    replaying it concurrently with eager calls of the same plan on that side stream would share
    it.)"""

    def __init__(self, device: torch.device, make):
        self._make = make
        self._by_stream: dict = {}
        if device.type == "cuda":
            getter = _raw_stream_getter()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._stream = lambda: getter(index)
        else:
            self._stream = lambda: 0

    def get(self):
        key = self._stream()
        ws = self._by_stream.get(key)
        if ws is None:
            ws = self._by_stream[key] = self._make()
        return ws
