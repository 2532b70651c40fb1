"""Random inputs against PyTorch: every op, route and backend, special values included.

Each example is drawn from a seeded generator (``random.Random``), so a failure names the seed
and the whole case, and reruns alone (``-k "batch_norm-triton-17"``). Draws cover:

* shapes: 2-D to 5-D, N = 1, spatial dims of 1, C = 1, odd sizes (at most a few hundred
  elements: Triton runs in its interpreter on the CPU);
* layouts: contiguous, channels_last (4-D and 5-D), and sliced views of a larger tensor (a step
  along the channel or the last dim); per-channel tensors sometimes strided views too;
* dtypes: fp32, fp16, bf16, fp64, and low-precision input with fp32 parameters (AMP);
* options: train/eval, affine or not, running statistics or not, momentum in {0, 0.1, 1,
  random, None (modules: the cumulative average)}, eps, fused ReLU, p in {1, 2, inf} and
  centered or not (l_p); gradients for x, weight, neither or both;
* routes: the functional ops, the modules (with torch's counter rule), and for BatchNorm the
  SyncBatchNorm stages (statistics, apply, gradient sums, dx) in a one-process group;
* special values: NaN, +inf and -inf at random positions of x, often at the first element of
  a channel (the statistics' shift), and for fp16/bf16 large finite values (+-6e4, finite in
  the input, far from overflow in the fp32 statistics); sometimes a NaN or inf in dy too.

Oracles, all in fp64 on the same (rounded) inputs: torch's own F.batch_norm / nn.BatchNorm*d
for BatchNorm; for noisy BatchNorm that same BatchNorm with the noise of
``noisy_batch_norm_noise`` applied by plain torch ops (training) or the noise's expectation
(eval); for l_p the definition in plain torch ops (torch.amax splits a tie's gradient
equally, as the kernels do). Gradients come from torch autograd through the oracle.

Comparison: NaN and +-inf must sit at exactly the same places, with the same signs, in every
output, gradient and running buffer. Finite values must agree within the per-dtype tolerance of
``helpers.TOLERANCES`` (fp64 1e-10, fp32 2e-5, fp16 2e-3, bf16 1.6e-2, absolute times a scale,
plus relative), on a scale that is the largest magnitude the quantity is built from: max|y|
for outputs, max|w| * max(invstd) * max|dy| too for dx (whose exact value may be ~0 while its
terms are not), momentum * max|x| for running_mean (an fp32 accumulation of values of that
size is good to a few of its ulps, in any order: an outlier of 6e4 at a channel's first element,
the shift, moves a mean of 0.09 by ~1e-3; torch's CPU kernel accumulates in fp64 and does not
show it), max|value| for the rest. In low precision an output within rounding of the dtype's
overflow threshold may be finite on one side and inf on the other; those few are left out.

Two draws are steered away from non-differentiable points, where fp32 and fp64 may take
different sides: centered l_inf gets a clear max |x - mean| per channel, and centered l_1 no
value within rounding of the mean. Training always has at least 2 values per channel.

Budget: ``BNKERNELS_FUZZ_EXAMPLES`` examples per (op, backend) (default 12: the file takes about
a minute on a 2-core CPU); ``BNKERNELS_FUZZ_SEED`` moves every draw. A larger run::

    BNKERNELS_FUZZ_EXAMPLES=200 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, use_backend
from torch import nn

import bnkernels as bnk

EXAMPLES = int(os.environ.get("BNKERNELS_FUZZ_EXAMPLES", "12"))
BASE_SEED = int(os.environ.get("BNKERNELS_FUZZ_SEED", "0"))
OPS = ("batch_norm", "noisy", "lp")
BACKENDS = ("reference", "cpu", "triton", "triton-split")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INF = math.inf
NAN = math.nan
CFG = bnk.NoiseConfig()
# numpy (under the Triton interpreter) warns about the NaN and inf arithmetic the cases ask for.
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]


# ----------------------------------------------------------------------------- the draw


@dataclass
class Draw:
    """One random case. ``specials``: (logical index, value) pairs written into x."""

    op: str
    seed: int
    shape: tuple
    layout: str  # "contiguous" | "channels_last" | "sliced-channel" | "sliced-last"
    chan_strided: bool  # weight/bias/running buffers as strided views
    dtype: torch.dtype
    pdtype: torch.dtype
    training: bool
    route: str  # "functional" | "module" | "sync" (BatchNorm's SyncBatchNorm stages)
    affine: bool
    track: bool
    momentum: float | None
    eps: float
    activation: str | None
    p: float
    centered: bool
    x_grad: bool
    w_grad: bool
    spread: float
    offset: float
    specials: list = field(default_factory=list)
    dy_specials: list = field(default_factory=list)  # the same, written into dy

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "")
        pd = str(self.pdtype).replace("torch.", "")
        parts = [f"seed={self.seed}", self.op, self.route, "x".join(map(str, self.shape)),
                 self.layout, f"{dt}/{pd}", "train" if self.training else "eval",
                 f"affine={self.affine}", f"track={self.track}", f"momentum={self.momentum}",
                 f"eps={self.eps:g}", f"grad(x={self.x_grad}, w={self.w_grad})",
                 f"x~{self.offset:g}+{self.spread:g}N"]
        if self.chan_strided:
            parts.append("strided-params")
        if self.op == "lp":
            parts.append(f"p={self.p} centered={self.centered}")
        else:
            parts.append(f"act={self.activation}")
        if self.specials:
            parts.append("specials=" + ",".join(f"{i}:{v}" for i, v in self.specials))
        if self.dy_specials:
            parts.append("dy_specials=" + ",".join(f"{i}:{v}" for i, v in self.dy_specials))
        return " ".join(parts)

    @property
    def batch_stats(self) -> bool:
        """Whether the statistics are the batch's (training, or eval without buffers)."""
        return self.training or not self.track

    @property
    def per_channel(self) -> int:
        return self.shape[0] * math.prod(self.shape[2:])


# The first STEERED examples of each op are steered (each attribute by a pattern in the index,
# everything else still drawn) so that a default run meets every class below;
# test_default_draws_cover_every_class checks that they do.
STEERED = 12
LAYOUTS = ("contiguous", "channels_last", "sliced-channel", "sliced-last")
LP_MODES = [(p, centered) for centered in (False, True) for p in (1, 2, INF)]


def draw(op: str, index: int) -> Draw:
    seed = BASE_SEED * 100_003 + OPS.index(op) * 10_007 + index
    r = random.Random(seed)
    k = index if index < STEERED else None
    layout = r.choice(LAYOUTS) if k is None else LAYOUTS[k % 4]
    while True:
        ndim = r.choice((2, 3, 4, 4, 5) if layout != "channels_last" else (4, 4, 5))
        n = r.choice((1, 1, 2, 3, 4, 5))
        c = r.choice((1, 2, 3, 5, 7))
        spatial = [r.choice((1, 1, 2, 3, 5)) for _ in range(ndim - 2)]
        if k in (0, 6):  # N = 1, with 2 or more values per channel to train on
            n, spatial = 1, spatial or [3]
            spatial[-1] = max(spatial[-1], 3)
        if k == 3:
            c = 1
        if k == 8:  # a spatial dim of 1
            spatial = [1, *spatial[1:]] if len(spatial) > 1 else [1, 3]
        shape = (n, c, *spatial)
        ndim = len(shape)
        if math.prod(shape) <= 280:
            break
    if layout == "sliced-last" and ndim == 2:
        layout = "sliced-channel"
    dtype = r.choice(DTYPES) if k is None else DTYPES[k % 4]
    pdtype = dtype
    low = dtype in (torch.float16, torch.bfloat16)
    if low and (r.random() < 0.4 if k is None else k in (5, 6)):
        pdtype = torch.float32  # AMP
    route = r.choice(("functional", "functional", "module"))
    if op == "batch_norm" and r.random() < 0.2:
        route = "sync"
    training = r.random() < 0.7
    p, centered = r.choice((1, 2, INF)), r.random() < 0.5
    if k is not None:
        route = "module" if k in (1, 5) else "functional"
        if op == "batch_norm" and k in (2, 9):
            route = "sync"
        training = k < 6 if op == "lp" else k % 4 != 3
        p, centered = LP_MODES[k % 6]
    training = training or route == "sync"
    track = r.random() < 0.8 if k is None else k not in (4, 10)
    if route == "functional" and not training:
        track = True  # eval without buffers is the modules' affair (batch statistics)
    momentum = r.choice((0.1, 0.1, 0.0, 1.0, round(r.random(), 3)))
    if route == "module" and (r.random() < 0.3 if k is None else k == 5):
        momentum = None  # the cumulative moving average
    activation = r.choice((None, None, "relu")) if k is None else (None, "relu")[k % 3 == 2]
    d = Draw(
        op=op, seed=seed, shape=shape, layout=layout,
        chan_strided=route == "functional" and (r.random() < 0.15 if k is None else k == 11),
        dtype=dtype, pdtype=pdtype, training=training, route=route,
        affine=r.random() < 0.75 if k is None else k not in (3, 8),
        track=track, momentum=momentum, eps=r.choice((1e-5, 1e-5, 1e-3, 0.1)),
        activation=activation if op != "lp" else None, p=p, centered=centered,
        x_grad=r.random() < 0.8, w_grad=r.random() < 0.6,
        spread=r.choice((1.0, 1.0, 3.0, 0.05)), offset=r.choice((0.0, 0.5, -2.0, 100.0)),
    )
    if d.batch_stats and d.per_channel < 2:  # torch refuses it: tested in test_bad_input
        d.shape = (2, *shape[1:])
    if r.random() < 0.45 if k is None else k % 2 == 0:
        numel = math.prod(d.shape)
        pool = [NAN, INF, -INF]
        if low:
            pool += [6.0e4, -6.0e4]
        for j in range(r.choice((1, 1, 2, 3))):
            if r.random() < 0.5 or (j == 0 and k is not None and k % 4 == 0):
                ch = r.randrange(d.shape[1])  # the first element of a channel: the shift
                idx = ch * math.prod(d.shape[2:])
            else:
                idx = r.randrange(numel)
            d.specials.append((idx, r.choice(pool)))
    if r.random() < 0.15 if k is None else k == 7:  # a NaN or inf in the incoming gradient
        d.dy_specials.append((r.randrange(math.prod(d.shape)), r.choice((NAN, INF, -INF))))
    return d


# ----------------------------------------------------------------------------- inputs


def _dims(x):
    return [0, *range(2, x.dim())]


def _chan(t, x):
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _values(d: Draw):
    """fp64 values (rounded through the case's dtypes) of x, dy and the per-channel tensors."""
    g = torch.Generator().manual_seed(d.seed)
    C = d.shape[1]
    x = torch.randn(d.shape, generator=g, dtype=torch.float64) * d.spread + d.offset
    x = x + _chan(torch.linspace(-1.0, 1.0, C, dtype=torch.float64), x)
    flat = x.reshape(-1)
    for idx, v in d.specials:
        flat[idx] = v
    if d.op == "lp" and d.centered and d.batch_stats:
        x = _steer_lp(x, d)
    x = x.to(d.dtype).double()
    dy = torch.randn(d.shape, generator=g, dtype=torch.float64)
    for idx, v in d.dy_specials:
        dy.view(-1)[idx] = v
    dy = dy.to(d.dtype).double()
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(d.pdtype).double()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(d.pdtype).double()
    rm = (torch.randn(C, generator=g, dtype=torch.float64) * 0.3).to(d.pdtype).double()
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(d.pdtype).double()
    return x, dy, w, b, rm, rv


def _steer_lp(x, d: Draw):
    """Centered l_inf: make each channel's max |x - mean| clear (a spike well above the rest);
    centered l_1: keep every value away from the mean, where sign(x - mean) flips."""
    xt = x.transpose(0, 1).reshape(x.shape[1], -1).clone()
    M = xt.shape[1]
    for c in range(xt.shape[0]):
        if not bool(torch.isfinite(xt[c]).all()):
            continue
        if d.p == INF:
            big = 4.0 * float((xt[c] - xt[c].mean()).abs().max()) + 1.0
            xt[c, (7 * c + 1) % M] += big
        elif d.p == 1:
            z = xt[c] - xt[c].mean()
            near = z.abs() < 0.05 * d.spread
            xt[c] = torch.where(near, xt[c] + 0.2 * d.spread, xt[c])
    return xt.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1).contiguous()


def _laid_out(t: torch.Tensor, d: Draw, device) -> torch.Tensor:
    """``t`` (contiguous, CPU) on ``device`` in the case's memory layout, same values."""
    t = t.to(device)
    if d.layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.clone(memory_format=fmt)
    if d.layout == "sliced-channel":  # every other channel of a tensor with 2C channels
        big = t.new_zeros((t.shape[0], 2 * t.shape[1], *t.shape[2:]))
        big[:, ::2] = t
        return big[:, ::2]
    if d.layout == "sliced-last":  # every other position of the last dim
        big = t.new_zeros((*t.shape[:-1], 2 * t.shape[-1]))
        big[..., ::2] = t
        return big[..., ::2]
    return t.clone()


def _param(t: torch.Tensor, d: Draw, device) -> torch.Tensor:
    t = t.to(d.pdtype)
    if d.chan_strided:
        big = torch.zeros(2 * t.numel(), dtype=t.dtype)
        big[::2] = t
        return big.to(device)[::2]
    return t.to(device, copy=True)


# ----------------------------------------------------------------------------- oracles


def _lp_stats(x, d: Draw):
    dims = _dims(x)
    mean = x.mean(dims)
    z = x - _chan(mean, x) if d.centered else x
    if d.p == 1:
        s = z.abs().mean(dims)
    elif d.p == 2:
        s = z.square().mean(dims).sqrt()
    else:
        s = z.abs().amax(dims)
    return mean, s


class _LpOracle(nn.Module):
    """l_p normalization by its definition, with the modules' buffers and counter rule."""

    def __init__(self, d: Draw, w, b, rm, rs):
        super().__init__()
        self.d = d
        self.weight = nn.Parameter(w.clone()) if d.affine else None
        self.bias = nn.Parameter(b.clone()) if d.affine else None
        self.running_mean = rm.clone() if d.track else None
        self.running_scale = rs.clone() if d.track else None
        self.num_batches_tracked = torch.tensor(0) if d.track else None

    def forward(self, x):
        d = self.d
        if d.batch_stats:
            mean, s = _lp_stats(x, d)
            if d.training and d.track:
                self.num_batches_tracked += 1
                f = d.momentum if d.momentum is not None else 1.0 / int(self.num_batches_tracked)
                with torch.no_grad():
                    self.running_mean.copy_(f * mean + (1 - f) * self.running_mean)
                    self.running_scale.copy_(f * s + (1 - f) * self.running_scale)
        else:
            mean, s = self.running_mean, self.running_scale
        y = (x - _chan(mean, x)) / _chan(s + d.eps, x)
        if self.weight is not None:
            y = y * _chan(self.weight, x) + _chan(self.bias, x)
        return y


def _lp_dx_torch_order(d: Draw, x, dy, w):
    """l_p's training dx by its closed form, in fp64, in the order of operations of torch's own
    BatchNorm backward (aten: dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * w),
    carried over to l_p (ds/dz = f / D: f = sign(z), z or sign(z) at the ties of max|z|)::

        dx = w / a * (dy - mean(dy)) - w * sum(dy * xhat) / (a * D) * (f - [centered] mean(f))

    with a = s + eps and xhat = (x - mean) / a. Where dy is not finite, the places of NaN and
    of +-inf in dx are a matter of that order (an inf - inf is NaN in one order and not in
    another), and autograd through the definition (``_LpOracle``) takes another: it subtracts
    the mean of (dy / a + the scale's term), so one infinite dy makes its whole channel NaN,
    where torch's BatchNorm (the same structure) leaves +-inf at about half of the channel.
    The oracle for those channels is this one, torch's order."""
    dims, M = _dims(x), x.numel() // x.shape[1]
    mean, s = _lp_stats(x, d)
    a = s + d.eps
    z = x - _chan(mean, x) if d.centered else x
    if d.p == 1:
        f, D = torch.sign(z), torch.full_like(s, float(M))
    elif d.p == 2:
        f, D = z, M * s
    else:
        tie = z.abs() == _chan(s, x)
        f, D = torch.where(tie, torch.sign(z), 0.0), tie.sum(dims).to(x.dtype)
    wa = (w if w is not None else torch.ones_like(a)) / a
    xhat = (x - _chan(mean, x)) / _chan(a, x)
    k = wa * (dy * xhat).sum(dims) / D
    fc = f - _chan(f.mean(dims), x) if d.centered else f
    return _chan(wa, x) * (dy - _chan(dy.mean(dims), x)) - _chan(k, x) * fc


def _torch_bn_module(d: Draw, w, b, rm, rv):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    m = cls[len(d.shape)](d.shape[1], d.eps, d.momentum, d.affine, d.track, dtype=w.dtype)
    return _load(m, d, w, b, rm, rv).train(d.training)


def _load(m, d: Draw, w, b, rm, rv):
    """``m`` with the draw's weight, bias and running buffers (running_var or running_scale)."""
    with torch.no_grad():
        if d.affine:
            m.weight.copy_(w)
            m.bias.copy_(b)
        if d.track:
            m.running_mean.copy_(rm)
            (m.running_scale if d.op == "lp" else m.running_var).copy_(rv)
    return m


def _oracle(d: Draw, x64, dy, w, b, rm, rv, noise, exact=True):
    """Outputs, gradients and buffers of torch (BatchNorm) or of the plain-torch composites
    (noisy, l_p): in fp64 (``exact``), or at the case's own dtypes (torch's own rounding, to
    judge ill-conditioned cases by). ``noise`` = the (s, m) of a noisy training call."""
    xd, pd = (torch.float64, torch.float64) if exact else (d.dtype, d.pdtype)
    x = x64.to(xd, copy=True).requires_grad_(d.x_grad)
    w, b, rm, rv = (t.to(pd) for t in (w, b, rm, rv))
    if d.route == "module" or d.op == "lp":
        m = (_LpOracle(d, w, b, rm, rv) if d.op == "lp"
             else _torch_bn_module(d, w, b, rm, rv))
        if m.weight is not None:
            m.weight.requires_grad_(d.w_grad)
            m.bias.requires_grad_(d.w_grad)
        y = m(x)
        params = (m.weight, m.bias)
        buffers = [m.running_mean, m.running_var if d.op != "lp" else m.running_scale]
        count = m.num_batches_tracked if d.route == "module" else None
    else:
        wt = w.clone().requires_grad_(d.w_grad) if d.affine else None
        bt = b.clone().requires_grad_(d.w_grad) if d.affine else None
        rmt, rvt = (rm.clone(), rv.clone()) if d.track else (None, None)
        y = F.batch_norm(x, rmt, rvt, wt, bt, d.training, d.momentum, d.eps)
        params, buffers, count = (wt, bt), [rmt, rvt], None
    if d.op == "noisy":
        if d.training:
            s, mm = noise
            y = s.to(y.dtype) * y + mm.to(y.dtype)
        else:
            es, em = CFG.expectation()
            y = es * y + em
    if d.activation == "relu":
        y = F.relu(y)
    y = y.to(xd)
    out = dict(y=y.detach(), running_mean=buffers[0], running_second=buffers[1], count=count)
    _backward(out, d, y, dy.to(xd), x, params)
    if d.op == "lp" and d.batch_stats and "dx" in out:
        rows = torch.isfinite(dy).transpose(0, 1).reshape(dy.shape[1], -1).all(1)
        if not bool(rows.all()):  # a channel with a non-finite dy: torch's order (see above)
            ordered = _lp_dx_torch_order(d, x.detach(), dy.to(xd), params[0])
            out["dx"] = torch.where(_chan(rows, x), out["dx"], ordered.to(out["dx"].dtype))
    return out


def _backward(out, d, y, dy, x, params):
    want = [t for t in (x, *params) if t is not None and t.requires_grad]
    if not want:
        return
    grads = iter(torch.autograd.grad(y, want, dy.to(y.dtype)))
    if x.requires_grad:
        out["dx"] = next(grads)
    if params[0] is not None and params[0].requires_grad:
        out["dweight"], out["dbias"] = next(grads), next(grads)


# ----------------------------------------------------------------------------- ours


def _bn_module_cls(d: Draw):
    cls = {"batch_norm": (bnk.BatchNorm1d, bnk.BatchNorm2d, bnk.BatchNorm3d),
           "noisy": (bnk.NoisyBatchNorm1d, bnk.NoisyBatchNorm2d, bnk.NoisyBatchNorm3d),
           "lp": (bnk.LpNorm1d, bnk.LpNorm2d, bnk.LpNorm3d)}[d.op]
    return cls[max(0, len(d.shape) - 3)]


def _ours(d: Draw, x64, dy64, w, b, rm, rv, device):
    """Our outputs, gradients and buffers, and the noise a noisy training call used."""
    x = _laid_out(x64.to(d.dtype), d, device).requires_grad_(d.x_grad)
    dy = _laid_out(dy64.to(d.dtype), d, device)
    noise = None
    if d.route == "module":
        kw = dict(eps=d.eps, momentum=d.momentum, affine=d.affine, track_running_stats=d.track,
                  dtype=d.pdtype)
        if d.op == "lp":
            kw.update(p=d.p, centered=d.centered)
        else:
            kw.update(activation=d.activation)
        if d.op == "noisy":
            kw.update(noise=CFG, seed=d.seed)
        m = _load(_bn_module_cls(d)(d.shape[1], **kw).to(device).train(d.training), d, w, b,
                  rm, rv)
        if m.weight is not None:
            m.weight.requires_grad_(d.w_grad)
            m.bias.requires_grad_(d.w_grad)
        if d.op == "noisy" and d.training:
            noise = bnk.noisy_batch_norm_noise(x.detach(), CFG, d.seed, int(m.noise_step))
        y = m(x)
        params = (m.weight, m.bias)
        buffers = [m.running_mean, m.running_scale if d.op == "lp" else m.running_var]
        count = m.num_batches_tracked
    else:
        wt = _param(w, d, device).requires_grad_(d.w_grad) if d.affine else None
        bt = _param(b, d, device).requires_grad_(d.w_grad) if d.affine else None
        rmt, rvt = (_param(rm, d, device), _param(rv, d, device)) if d.track else (None, None)
        params, buffers, count = (wt, bt), [rmt, rvt], None
        if d.route == "sync":
            y = _sync_stages(x, wt, bt, rmt, rvt, d)
        elif d.op == "batch_norm":
            y = bnk.batch_norm(x, rmt, rvt, wt, bt, d.training, d.momentum, d.eps, d.activation)
        elif d.op == "noisy":
            step = d.seed % 1000
            if d.training:
                noise = bnk.noisy_batch_norm_noise(x.detach(), CFG, d.seed, step)
            y = bnk.noisy_batch_norm(x, rmt, rvt, wt, bt, d.training, d.momentum, d.eps, CFG,
                                     d.seed, step, d.activation)
        else:
            y = bnk.lp_norm(x, d.p, rmt, rvt, wt, bt, d.training, d.momentum, d.eps,
                            d.centered)
    out = dict(y=y.detach(), running_mean=buffers[0], running_second=buffers[1], count=count)
    assert y.dtype == d.dtype and y.shape == x.shape
    if d.layout in ("contiguous", "channels_last"):
        assert y.stride() == x.stride(), "the output keeps the input's memory format"
    _backward(out, d, y, dy, x, params)
    return out, noise


class _OneProcess:
    """torch.distributed's collectives for a group of one process (what they do there)."""

    @staticmethod
    def all_gather(out, t, group=None):
        out[0].copy_(t)

    @staticmethod
    def all_reduce(t, group=None):
        return None


def _sync_stages(x, w, b, rm, rv, d: Draw):
    """SyncBatchNorm's multi-process path (statistics, merge, apply; gradient sums, dx), in a
    one-process group (``_one_process_group`` must be active through the backward too)."""
    from bnkernels import sync

    return sync.sync_batch_norm(x, rm, rv, w, b, d.momentum, d.eps, d.activation, None, 1)


@contextlib.contextmanager
def _one_process_group(active: bool):
    from bnkernels import sync

    dist = sync.dist
    if active:
        sync.dist = _OneProcess
    try:
        yield
    finally:
        sync.dist = dist


# ----------------------------------------------------------------------------- comparison


def _compare(name, actual, expected, dtype, scale=None, theirs=None):
    """Same NaN/+-inf pattern; finite values within TOLERANCES[dtype] on ``scale``, or, where
    torch's own result at this dtype (``theirs``) is itself further off, no more than twice
    its error (plus one tolerance unit): the rule of ``helpers.assert_no_worse_than_torch``."""
    assert actual is not None and expected is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    keep = torch.ones_like(e, dtype=torch.bool)
    if dtype in (torch.float16, torch.bfloat16):  # rounding either side of the overflow
        edge = torch.finfo(dtype).max * (1 - 2 * TOLERANCES[dtype]["rtol"])
        keep = ~(torch.isfinite(e) & (e.abs() >= edge))
    e_low = e.to(dtype).double() if actual.dtype in (torch.float16, torch.bfloat16) else e
    for what, fa, fe in (("NaN", torch.isnan(a), torch.isnan(e)),
                         ("+inf", torch.isposinf(a), torch.isposinf(e_low)),
                         ("-inf", torch.isneginf(a), torch.isneginf(e_low))):
        bad = (fa != fe) & keep
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(
                f"{name}: {what} at different places ({int(fa.sum())} ours vs {int(fe.sum())}"
                f" torch); first at flat index {i}: ours {float(a.reshape(-1)[i])}, "
                f"expected {float(e.reshape(-1)[i])}")
    fin = torch.isfinite(a) & torch.isfinite(e_low) & keep
    a, e = a[fin], e[fin]
    if e.numel() == 0:
        return
    tol = TOLERANCES[dtype]
    if scale is None or not math.isfinite(scale):
        scale = float(e.abs().max())
    scale = max(1.0, scale, float(e.abs().max()))
    bound = tol["atol"] * scale + tol["rtol"] * e.abs()
    err = (a - e).abs()
    if bool((err > bound).any()) and theirs is not None:
        t = theirs.detach().double().cpu()[fin]
        torch_err = float((t - e).abs().nan_to_num(0, 0, 0).max())
        if float(err.max()) <= 2 * torch_err + tol["atol"] * scale:
            return
    if bool((err > bound).any()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name} ({dtype}): {int((err > bound).sum())}/{e.numel()} outside atol="
            f"{tol['atol']}*{scale:.3g} + rtol={tol['rtol']}; worst: ours {float(a[i]):.9g}, "
            f"expected {float(e[i]):.9g}, |diff| {float(err[i]):.3g} > {float(bound[i]):.3g}")


def _dx_scale(d: Draw, x64, dy, w, rv):
    """max|w| * max(invstd) * max|dy| over finite channels: the size of dx's terms."""
    finite = torch.isfinite(x64)
    if not bool(finite.any()):
        return 1.0
    if d.batch_stats:
        xt = x64.transpose(0, 1).reshape(x64.shape[1], -1)
        ok = torch.isfinite(xt).all(1)
        if not bool(ok.any()):
            return 1.0
        xt = xt[ok]
        if d.op == "lp":
            z = xt - xt.mean(1, keepdim=True) if d.centered else xt
            s = {1: z.abs().mean(1), 2: z.square().mean(1).sqrt(), INF: z.abs().amax(1)}[d.p]
            inv = 1.0 / (s + d.eps)
            inv = inv * (1.0 + z.abs().amax(1) * inv)  # the scale's own derivative
        else:
            inv = xt.var(1, unbiased=False).add(d.eps).rsqrt()
    else:
        inv = 1.0 / (rv + d.eps) if d.op == "lp" else (rv + d.eps).rsqrt()
    wmax = float(w.abs().max()) if d.affine else 1.0
    es = CFG.expectation()[0] * 1.5 if d.op == "noisy" else 1.0
    dy_max = float(dy[torch.isfinite(dy)].abs().max()) if bool(torch.isfinite(dy).any()) else 1.0
    return wmax * float(inv.max()) * dy_max * es


def _mean_scale(d: Draw, x64):
    """The scale of a mean's error: an fp32 accumulation of values of magnitude max|x| is good
    to a few ulps of max|x| (torch's CPU kernel accumulates in fp64, exact where an outlier
    dwarfs the mean), times the factor that takes it to running_mean."""
    finite = x64[torch.isfinite(x64)]
    factor = 1.0 if d.momentum is None else d.momentum
    return factor * float(finite.abs().max()) if finite.numel() else None


def check(d: Draw, device="cpu"):
    """Our ops on ``device`` against the oracles (on the CPU), for draw ``d``."""
    x64, dy, w, b, rm, rv = _values(d)
    with _one_process_group(d.route == "sync"):
        ours, noise = _ours(d, x64, dy, w, b, rm, rv, device)
    if noise is not None:
        noise = tuple(t.cpu() for t in noise)
    exact = _oracle(d, x64, dy, w, b, rm, rv, noise)
    theirs = _oracle(d, x64, dy, w, b, rm, rv, noise, exact=False)
    tag = f"[{d}]"
    _compare(f"y {tag}", ours["y"], exact["y"], d.dtype, theirs=theirs["y"])
    for key in ("running_mean", "running_second"):
        if exact[key] is None:
            assert ours[key] is None, f"{key} {tag}"
        else:
            assert ours[key].dtype == d.pdtype, f"{key} keeps its dtype {tag}"
            scale = _mean_scale(d, x64) if key == "running_mean" else None
            _compare(f"{key} {tag}", ours[key], exact[key], d.pdtype, scale=scale,
                     theirs=theirs[key])
    if exact["count"] is not None:
        assert int(ours["count"]) == int(exact["count"]), f"num_batches_tracked {tag}"
    assert ours.keys() == exact.keys(), f"gradients {sorted(ours)} vs {sorted(exact)} {tag}"
    if "dx" in exact:
        _compare(f"dx {tag}", ours["dx"], exact["dx"], d.dtype,
                 scale=_dx_scale(d, x64, dy, w, rv), theirs=theirs["dx"])
    if "dweight" in exact:
        _compare(f"dweight {tag}", ours["dweight"], exact["dweight"], d.pdtype,
                 theirs=theirs["dweight"])
        _compare(f"dbias {tag}", ours["dbias"], exact["dbias"], d.pdtype,
                 theirs=theirs["dbias"])


# ----------------------------------------------------------------------------- tests


CASES = [(op, be, i) for op in OPS for be in BACKENDS for i in range(EXAMPLES)]


def test_default_draws_cover_every_class():
    """The steered first examples of each op meet every class the module docstring lists."""
    for op in OPS:
        draws = [draw(op, i) for i in range(STEERED)]
        seen = set()
        for d in draws:
            seen |= {d.layout, d.dtype, ("amp", d.pdtype != d.dtype), ("train", d.training),
                     ("route", d.route), ("affine", d.affine), ("track", d.track),
                     ("momentum None", d.momentum is None), ("N=1", d.shape[0] == 1),
                     ("C=1", d.shape[1] == 1), ("spatial 1", 1 in d.shape[2:]),
                     ("specials", bool(d.specials)), ("strided params", d.chan_strided),
                     ("dy specials", bool(d.dy_specials))}
            first = {i for i, _ in d.specials} & {c * math.prod(d.shape[2:])
                                                   for c in range(d.shape[1])}
            seen.add(("special at a channel's first element", bool(first)))
            seen.add(("lp", d.p, d.centered, d.training) if op == "lp" else
                     ("act", d.activation))
        want = {*LAYOUTS, *DTYPES, ("amp", True), ("train", True), ("train", False),
                ("route", "module"), ("affine", False), ("track", False),
                ("momentum None", True), ("N=1", True), ("C=1", True), ("spatial 1", True),
                ("specials", True), ("special at a channel's first element", True),
                ("strided params", True), ("dy specials", True)}
        if op == "batch_norm":
            want.add(("route", "sync"))
        if op == "lp":
            want |= {("lp", p, c, t) for p, c in LP_MODES for t in (True, False)}
        else:
            want |= {("act", None), ("act", "relu")}
        assert want <= seen, f"{op}: the default draws miss {want - seen}"


@pytest.mark.parametrize(("op", "backend", "index"), CASES,
                         ids=[f"{op}-{be}-{i}" for op, be, i in CASES])
def test_fuzz_against_torch(op, backend, index, device):
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("the cpu backend runs CPU tensors")
    d = draw(op, index)
    use_backend(backend)
    check(d, device)
