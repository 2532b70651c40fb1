"""The cpu backend: BatchNorm, noisy BatchNorm and l_p normalization on the CPU at torch's
speed, beside the reference oracle (which "auto" used on the CPU before).

The kernels are C (``kernels.c``, built once per machine and cached, see :mod:`.build`): one
call per direction, statistics accumulated in double in a fixed order (two-pass, never
E[x^2] - E[x]^2; deterministic), running statistics updated inside the forward's call, both
layouts the other backends read ((N, C, S) contiguous and channels last / 2-D) without copies,
float32 and float64 natively, float16 and bfloat16 converted to float32 around the call (as
the reference computes them). Noisy BatchNorm takes its noise from the reference's Philox
(the same bits as every backend, the same floats as the reference) and keeps it for the
backward (regenerating it would cost as much as the forward's generation again, see
docs/cpu-path.md). SyncBatchNorm's stages are the reference's.

The plans are thin: everything that depends on the signature (layout, kernel, flags) is
bound once; a call allocates its outputs and makes one foreign call.
"""

from __future__ import annotations

import torch

from ..family import family_of
from ..layout import layout_of
from ..plan import FLOAT_DTYPES, acc_dtype
from ..reference import BatchNormPlan as _ReferenceBatchNormPlan
from ..reference import formulas as _ref
from . import build

_LOW = (torch.float16, torch.bfloat16)
OPS = ("batch_norm", "noisy_batch_norm", "noisy_batch_norm_noise", "lp_norm")
_M32 = 0xFFFFFFFF


def noise_of(lib, x, noise):
    """(s, m) of noisy BatchNorm, float32 with x's shape (contiguous, the logical order),
    bit-identical to :func:`~..reference.formulas.noisy_bn_noise_reference`: the Philox words,
    the uniforms and m in C (``bnk_noise_prep``), then the reference's own torch operations
    for s = sigma_j + r_sigma sqrt(-2 log u1) cos(2 pi u2)."""
    cfg, seed, step = noise
    if isinstance(step, torch.Tensor):
        step = int(step.reshape(()).item())
    N, C, n = x.shape[0], x.shape[1], x.numel()
    S = n // (N * C) if n else 0
    m = torch.empty(x.shape, dtype=torch.float32)
    u1 = torch.empty(n, dtype=torch.float32)
    a2 = torch.empty(n, dtype=torch.float32)
    sigma = torch.empty(C, dtype=torch.float32)
    lib.bnk_noise_prep(seed, step & _M32, N, C, S, cfg.n_mu, cfg.n_sigma, cfg.r_mu,
                       m.data_ptr(), u1.data_ptr(), a2.data_ptr(), sigma.data_ptr())
    z = u1.log_().mul_(-2.0).sqrt_().mul_(a2.cos_())
    s = z.mul_(cfg.r_sigma).view(N, C, S).add_(sigma.view(1, C, 1))
    return s.view(x.shape), m


class _Kept(tuple):
    """What a noisy forward saves as ``saved_a``: (mean, s, m), the noise kept for the
    backward. Contiguous already (``contiguous`` is for wrappers that make saved statistics
    contiguous, as :class:`~..plan.ContiguousChannels`)."""

    __slots__ = ()

    def contiguous(self):
        return self


def _ptr(t):
    return None if t is None else t.data_ptr()


def _f32(t):
    return None if t is None else t.float()


def _step_snapshot(noise):
    if noise is not None and isinstance(noise[2], torch.Tensor):
        return noise[2].reshape(1).to(torch.int64, copy=True)
    return None


class _Common:
    """What both families bind from the signature."""

    def _bind(self, sig, lib, family):
        self.sig = sig
        self.training = sig.training
        lay = layout_of(sig.shape, sig.stride, sig.device)
        self.lay, self.copy = lay, lay.copy
        self.dims = (lay.N, lay.C, lay.S, int(lay.kind == "mc"))
        self.C = lay.C
        self.low = sig.dtype in _LOW
        self.acc = acc_dtype(sig.dtype)
        suf = "f64" if sig.dtype == torch.float64 else "f32"
        self._fwd = getattr(lib, f"bnk_{family}_fwd_{suf}")
        self._bwd = getattr(lib, f"bnk_{family}_bwd_{suf}")
        self._bn_bwd = getattr(lib, f"bnk_bn_bwd_{suf}")
        # float16 parameters with a float16 input (bfloat16 alike): float32 copies go in
        self.cast_params = self.low and any(c is not None and c[0] != torch.float32
                                            for c in sig.channels)

    def _input(self, t):
        """x (or dy, strided as x) as the kernels read it: the layout's strides, T."""
        if self.copy:
            t = t.contiguous()
        return t.float() if self.low else t

    def _grad_input(self, dy, xk):
        if self.low:
            dy = dy.float()
        return self.lay.like(dy, xk)

    def _output(self, y, x):
        if self.low:
            y = y.to(x.dtype)
        return self.lay.restore(y, x) if self.copy else y

    def _forward_call(self, x, running_mean, running_stat, weight, bias, momentum, eps, head,
                      tail, need_saved):
        """(y, saved_a, saved_b) of the family's forward kernel, called once:
        ``fwd(x, y, *dims, training, *head, w, b, eps, momentum, running_mean, running_stat,
        saved_a, saved_b, *tail)`` (saved None where nothing is kept; float16 parameters go in
        as float32 copies, the running buffers copied back after a training step)."""
        xk = self._input(x)
        rm, rs, w, b = running_mean, running_stat, weight, bias
        if self.cast_params:
            rm, rs, w, b = _f32(rm), _f32(rs), _f32(w), _f32(b)
        y = torch.empty_like(xk)
        keep = self.training or need_saved
        sa = torch.empty(self.C, dtype=self.acc) if keep else None
        sb = torch.empty(self.C, dtype=self.acc) if keep else None
        self._fwd(xk.data_ptr(), y.data_ptr(), *self.dims, int(self.training), *head, _ptr(w),
                  _ptr(b), eps, momentum, _ptr(rm), _ptr(rs), _ptr(sa), _ptr(sb), *tail)
        if self.cast_params and running_mean is not None and self.training:
            running_mean.copy_(rm)
            running_stat.copy_(rs)
        return self._output(y, x), sa, sb

    def _grad_call(self, kernel, dy, x, weight, bias, needs, args):
        """(dx, dw, db) of a backward kernel, called once:
        ``kernel(dy, x, dx, *dims, *args, dw, db)`` (None for what ``needs`` declines)."""
        xk = self._input(x)
        dyk = self._grad_input(dy, xk)
        dx = torch.empty_like(xk) if needs[0] else None
        dw = torch.empty(self.C, dtype=self.acc) if needs[1] else None
        db = torch.empty(self.C, dtype=self.acc) if needs[2] else None
        kernel(dyk.data_ptr(), xk.data_ptr(), _ptr(dx), *self.dims, *args, _ptr(dw), _ptr(db))
        return (None if dx is None else self._output(dx, x),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype))

    def _bwd_eval(self, dy, x, mean, invstd, weight, bias, needs, relu=0, ns=None, nm=None):
        """The eval backward (statistics constant): BatchNorm's kernel, training off."""
        return self._bn_backward(dy, x, mean, invstd, weight, bias, needs, 0, relu, ns, nm)

    def _bn_backward(self, dy, x, mean, invstd, weight, bias, needs, training, relu, ns, nm):
        w, b = (_f32(weight), _f32(bias)) if self.cast_params else (weight, bias)
        return self._grad_call(self._bn_bwd, dy, x, weight, bias, needs, (
            training, mean.data_ptr(), invstd.data_ptr(), _ptr(w), _ptr(b), relu, _ptr(ns),
            _ptr(nm)))


class BatchNormPlan(_Common, _ReferenceBatchNormPlan):
    """BatchNorm and noisy BatchNorm of one signature (:class:`~..plan.Plan`); SyncBatchNorm's
    stages are the reference's. Noisy: saved_a = (mean, s, m), the noise kept for the
    backward."""

    def __init__(self, sig, lib):
        _ReferenceBatchNormPlan.__init__(self, sig)
        self._bind(sig, lib, "bn")
        self.relu = int(sig.activation == "relu")
        self._lib = lib
        # the noise laid out as the kernels read x: channels last where x is (4-D/5-D)
        self.noise_format = None
        if self.dims[3] and self.dims[2] > 1:
            self.noise_format = torch.channels_last if len(sig.shape) == 4 else \
                torch.channels_last_3d

    def _noise(self, x, noise):
        ns, nm = noise_of(self._lib, x, noise)
        if self.noise_format is not None:
            ns = ns.contiguous(memory_format=self.noise_format)
            nm = nm.contiguous(memory_format=self.noise_format)
        return ns, nm

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_var, _, momentum, eps, noise, counter = call
        if counter is not None:
            counter.add_(1)
        ns = nm = None
        if noise is not None:
            ns, nm = self._noise(x, noise)
        y, sa, sb = self._forward_call(x, running_mean, running_var, weight, bias, momentum, eps,
                                       (), (_ptr(ns), _ptr(nm), self.relu), need_saved)
        if not need_saved:
            return y, None, None, None
        if ns is not None:
            sa = _Kept((sa, ns, nm))
        return y, sa, sb, _step_snapshot(noise)

    def backward(self, dy, x, weight, bias, saved, needs):
        mean, invstd, noise = saved[0], saved[1], saved[3]
        ns = nm = None
        if isinstance(mean, tuple):
            mean, ns, nm = mean
        elif noise is not None:
            ns, nm = self._noise(x, noise)
        return self._bn_backward(dy, x, mean, invstd, weight, bias, needs,
                                 int(self.training), self.relu, ns, nm)


class LpNormPlan(_Common):
    """l_p normalization of one signature (saved as the reference: mean and s_p in training;
    in eval the running mean and 1/(running_scale + eps), and BatchNorm's eval backward)."""

    def __init__(self, sig, lib):
        self._bind(sig, lib, "lp")
        self.p = 0 if sig.p == float("inf") else int(sig.p)
        self.centered = int(bool(sig.centered))
        self._head = (self.p, self.centered)  # the forward kernel's arguments after training

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_scale, _, momentum, eps, _, counter = call
        if counter is not None:
            counter.add_(1)
        y, sa, sb = self._forward_call(x, running_mean, running_scale, weight, bias, momentum,
                                       eps, self._head, (), need_saved)
        if not need_saved:
            return y, None, None, None
        return y, sa, sb, None

    def backward(self, dy, x, weight, bias, saved, needs):
        a, b, eps = saved[0], saved[1], saved[2]
        if not self.training:  # constant statistics: BatchNorm's eval backward, invstd = b
            return self._bwd_eval(dy, x, a, b, weight, bias, needs)
        w = _f32(weight) if self.cast_params else weight
        return self._grad_call(self._bwd, dy, x, weight, bias, needs,
                               (*self._head, a.data_ptr(), b.data_ptr(), _ptr(w), eps))


class CpuBackend:
    name = "cpu"

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"

    def library(self):
        """The loaded C kernels (built on first use), or a str: why there are none."""
        return build.library()

    def is_built(self) -> bool:
        return not isinstance(build.library(), str)

    def unavailable_reasons(self) -> list[str]:
        lib = build.library()
        return [f"the cpu backend's C kernels are unavailable: {lib}"] if isinstance(lib, str) \
            else []

    def not_supported_reasons(self, op, x) -> list[str]:
        reasons = []
        if op not in OPS:
            reasons.append(f"op {op!r} is not supported by the cpu backend (it runs {OPS})")
        if x.dtype not in FLOAT_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported")
        if x.device.type != "cpu":
            reasons.append(f"x is on {x.device}; the cpu backend runs CPU tensors only")
        return reasons

    def plan(self, sig):
        """The plan of ``sig``: its op family's cpu plan."""
        return family_of(sig.op).make_plan(self.name, sig)

    def noise(self, x, noise):
        lib = build.library()
        if isinstance(lib, str):
            return _ref.noisy_bn_noise_reference(x, noise)
        return noise_of(lib, x.cpu(), noise)


def _with_library(cls):
    """A family's cpu plan factory (its descriptor's ``plans["cpu"]``): the plan on the loaded
    C kernels."""

    def make(sig):
        lib = build.library()
        if isinstance(lib, str):
            raise RuntimeError(f"bnkernels: the cpu backend is unavailable: {lib}")
        return cls(sig, lib)

    return make


batch_norm_plan = _with_library(BatchNormPlan)
lp_norm_plan = _with_library(LpNormPlan)
