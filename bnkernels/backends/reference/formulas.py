"""The reference formulas: eager PyTorch, the correctness oracle of every kernel and the CPU path.

Forward and backward are written out as explicit formulas (not autograd through
``F.batch_norm``), in fp32 (fp64 for fp64 input), so the backward can be checked on its own.

BatchNorm, over the M = N * prod(spatial) values of each channel::

    mean    = sum(x) / M
    var     = sum((x - mean)^2) / M                       (biased: used to normalize)
    invstd  = 1 / sqrt(var + eps)
    xhat    = (x - mean) * invstd
    y       = act(w * xhat + b)

    running_mean <- momentum * mean + (1 - momentum) * running_mean
    running_var  <- momentum * var * M / (M - 1) + (1 - momentum) * running_var   (unbiased)

Backward, with g = dy (times [y > 0] for the fused ReLU)::

    dbias   = sum(g)
    dweight = sum(g * xhat)
    dx      = w * invstd * (g - dbias / M - xhat * dweight / M)      (training)
    dx      = w * invstd * g                                         (eval: statistics constant)
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

from ..plan import acc_dtype

_log = logging.getLogger(__name__)  # under the "bnkernels" logger


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] tensor shaped to broadcast against x (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def exponential_average_factor(momentum, num_batches_tracked: int | None) -> float:
    """The factor PyTorch's _BatchNorm uses: ``momentum``, or 1/num_batches when it is None."""
    if momentum is None:
        return 1.0 / float(num_batches_tracked)
    return momentum


def _relu(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, torch.zeros_like(y), y)  # NaN propagates, as torch.relu


def _relu_mask(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(y <= 0, torch.zeros_like(g), g)  # as torch's threshold_backward


def batch_norm_reference_fwd(x, running_mean, running_var, weight, bias, training, momentum,
                             eps, activation, noise=None, residual=None):
    """Returns ``(y, save_mean, save_invstd)``; updates the running buffers in place.

    In eval mode ``(y, None, None)``: the statistics are the running buffers.
    ``noise = (NoiseConfig, seed, step)``: noisy BatchNorm, y = act(s * a + m), a = w xhat + b.
    ``residual`` (x's shape and dtype): added before the activation, y = act(a + residual).
    """
    acc = acc_dtype(x.dtype)
    if training:
        shift, mean_d, var = _shifted_stats(x)
        mean = shift + mean_d
        invstd = 1.0 / torch.sqrt(var + eps)
        if running_mean is not None:
            m = x.numel() // x.shape[1]
            unbiased = var * (m / (m - 1))
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
        # x - mean as (x - shift) - mean_d: exact where the fp32 mean itself would round
        centered = (x.to(acc) - _per_channel(shift, x)) - _per_channel(mean_d, x)
        y = _apply_centered(centered, invstd, weight, bias, activation, noise, x, residual)
        return y, mean, invstd
    invstd = 1.0 / torch.sqrt(running_var.to(acc) + eps)
    y = batch_norm_reference_apply(x, running_mean, invstd, weight, bias, activation, noise,
                                   residual)
    return y, None, None


def _shifted_stats(x):
    """Per-channel (shift, mean(x - shift), biased var) with shift = the channel's first
    element (x[0, c, 0, ...]): the statistics of x - shift lose nothing to a large mean (a
    channel of mean 1e4 and std 1e-2 in fp32 keeps its variance and its mean's digits).

    Special values, as torch: a channel holding a NaN or +-inf (its plain sum is not finite,
    and neither are its shifted statistics) has torch's mean sum(x) / M, i.e. the sum itself
    (+inf, -inf, or NaN for a NaN or both infinities), returned as its shift with
    mean(x - shift) = 0, and a NaN variance. The kernels apply the same rule."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    dims = _reduce_dims(x)
    shift = x[0].reshape(x.shape[1], -1)[:, 0].to(acc)
    d = xf - _per_channel(shift, x)
    var, mean_d = torch.var_mean(d, dim=dims, unbiased=False)
    total = xf.sum(dims)
    special = ~torch.isfinite(total) & ~(torch.isfinite(mean_d) & torch.isfinite(var))
    shift = torch.where(special, total, shift)
    mean_d = torch.where(special, torch.zeros_like(mean_d), mean_d)
    var = torch.where(special, torch.full_like(var, float("nan")), var)
    return shift, mean_d, var


def batch_norm_reference_stats(x):
    """Per-channel (mean, biased var), fp32 (fp64 for fp64 x), around a per-channel shift."""
    shift, mean_d, var = _shifted_stats(x)
    return shift + mean_d, var


def batch_norm_reference_apply(x, mean, invstd, weight, bias, activation, noise=None,
                               residual=None):
    """y = act(s * a + m + r) (or act(a + r); r = residual, or 0),
    a = w * (x - mean) * invstd + b."""
    acc = acc_dtype(x.dtype)
    centered = x.to(acc) - _per_channel(mean.to(acc), x)
    return _apply_centered(centered, invstd, weight, bias, activation, noise, x, residual)


def _apply_centered(centered, invstd, weight, bias, activation, noise, x, residual=None):
    acc = centered.dtype
    y = _affine(centered * _per_channel(invstd.to(acc), x), weight, bias, x, acc)
    if noise is not None:
        s, m = noisy_bn_noise_reference(x, noise)
        y = y.mul_(s).add_(m)  # s * y + m (y is a temporary of this call)
    if residual is not None:
        y = y + residual.to(acc)  # in the accumulation dtype, rounded once to x's dtype
    if activation == "relu":
        y = _relu(y)
    return _like(y, x)


def _affine(xhat, weight, bias, x, acc):
    if weight is not None:
        xhat = xhat * _per_channel(weight.to(acc), x)
    if bias is not None:
        xhat = xhat + _per_channel(bias.to(acc), x)
    return xhat


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` cast to x's dtype, in x's memory format."""
    out = torch.empty_like(x)
    out.copy_(t)
    return out


# ----------------------------------------------------------------------------- noisy BatchNorm
# The noise of Algorithm 1, generated exactly as the Triton kernels generate it (see
# bnkernels/backends/triton/noise.py): Philox4x32-10 keyed by the seed, counter
# (logical index lo, hi, step, stream), written here in plain int64 torch arithmetic.

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al., 2011) on int64 tensors holding uint32 values.

    A product of two uint32 values wraps in int64 exactly as the uint64 product it equals mod
    2^64, so the high and low words are recovered with a shift and a mask."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        pa = c0 * _PHILOX_ROUND_A
        pb = c2 * _PHILOX_ROUND_B
        c0, c1, c2, c3 = (((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32,
                          ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32)
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    return ((r >> 8).to(torch.float32) + 0.5) * 2.0**-24  # in (0, 1)


def _philox_top_bits_torch(seed: int, n: int, step, dev, start: int = 0) -> torch.Tensor:
    """[3, n] float32: r >> 8 for the first three Philox words of counters
    (i mod 2^32, i >> 32, step, 0), i = start..start+n-1 (``step``: an int or an int64 tensor
    on ``dev``, read without leaving the device)."""
    idx = torch.arange(start, start + n, device=dev, dtype=torch.int64)
    zero = torch.zeros_like(idx)
    r0, r1, r2, _ = philox4x32(seed, idx & _M32, idx >> 32, zero + step, zero)
    return torch.stack([r0 >> 8, r1 >> 8, r2 >> 8]).to(torch.float32)


_CHUNK = 1 << 14
"""Counters per pass of :func:`_philox_top_bits_cpu`: its six uint64 buffers (768 KiB) stay in
a core's L2 cache. A power of two, so no pass straddles a multiple of 2^32."""


def _philox_top_bits_cpu(seed: int, n: int, step: int, start: int = 0) -> torch.Tensor:
    """:func:`_philox_top_bits_torch` on the CPU, the same bits several times faster.

    The integer work runs in C (``philox.c``, compiled at this process's first call, see
    :func:`_philox_c`): one loop over the counters that the compiler vectorizes, ~5x faster
    than :func:`_philox_passes`, numpy's version, which is what runs when no C compiler is
    found or the compiled code fails its check. With several torch threads
    (``torch.get_num_threads()``), as many threads share the counters (ctypes and numpy
    release the GIL); the bits depend on neither the path nor the threads."""
    step &= _M32
    fn = _PHILOX_FN if _PHILOX_FN is not None else _philox_c()
    if fn:
        out = torch.empty((3, n), dtype=torch.float32)
        threads = min(torch.get_num_threads(), n // _C_MIN_PER_THREAD)
        seed &= _M64
        if threads <= 1:
            fn(seed, step, start, n, out.data_ptr(), n)
        else:
            ptr, per = out.data_ptr(), -(-n // threads)
            list(_thread_pool(threads).map(
                lambda lo: fn(seed, step, start + lo, min(per, n - lo), ptr + 4 * lo, n),
                range(0, n, per)))
        return out
    out = np.empty((3, n), np.float32)
    bounds = [start, *range((start // _CHUNK + 1) * _CHUNK, start + n, _CHUNK), start + n]
    passes = list(zip(bounds[:-1], bounds[1:]))
    threads = min(torch.get_num_threads(), len(passes) // 4)
    if threads <= 1:
        _philox_passes(seed, step, start, passes, out)
    else:
        per = -(-len(passes) // threads)
        parts = [passes[i:i + per] for i in range(0, len(passes), per)]
        list(_thread_pool(len(parts)).map(
            lambda part: _philox_passes(seed, step, start, part, out), parts))
    return torch.from_numpy(out)


_M64 = (1 << 64) - 1
_C_MIN_PER_THREAD = 1 << 16
"""Counters per thread below which the C path uses fewer threads (64Ki take ~0.3 ms)."""

_PHILOX_FN = None
"""The compiled ``bnk_philox_top_bits`` (a ctypes function), False where it is unavailable,
None until :func:`_philox_c` has looked."""
_PHILOX_LOCK = threading.Lock()


def _c_compilers() -> list:
    """Commands to try, in order: Python's own ``CC`` (sysconfig), then ``cc`` and ``gcc``."""
    import shlex
    import sysconfig

    found = []
    for cmd in (sysconfig.get_config_var("CC") or "", "cc", "gcc"):
        argv = shlex.split(cmd)
        if argv and argv not in found:
            found.append(argv)
    return found


def _philox_c():
    """The compiled Philox (see ``philox.c``), or False: built once per process, at the
    first call, into a private temporary directory removed once the library is loaded (no
    cache on disk). Its output is checked against :func:`_philox_passes` on counters that
    cross a multiple of 2^32 before it is used. Any failure (no compiler, a failed compile,
    load or check) leaves the numpy path, with one warning on the ``bnkernels`` logger: the
    bits are the same, the noise about twice as slow."""
    global _PHILOX_FN
    with _PHILOX_LOCK:
        if _PHILOX_FN is None:
            why = "no C compiler found, or the compiled code failed its check against numpy"
            try:
                _PHILOX_FN = _build_philox_c()
            except Exception as e:
                _PHILOX_FN, why = False, f"{type(e).__name__}: {e}"
            if _PHILOX_FN is False:
                _log.warning("the compiled CPU Philox is unavailable (%s); noisy BatchNorm's "
                             "CPU noise comes from numpy instead (the same bits, slower)", why)
        return _PHILOX_FN


def _build_philox_c():
    import ctypes
    import shutil
    import subprocess
    import tempfile

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "philox.c")
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off"]
    tmp = tempfile.mkdtemp(prefix="bnkernels-philox-")
    try:
        lib = os.path.join(tmp, "philox.so")
        for cc in _c_compilers():
            if shutil.which(cc[0]) is None:
                continue
            done = subprocess.run([*cc, *flags, src, "-o", lib], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            return False
        fn = ctypes.CDLL(lib).bnk_philox_top_bits
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a loaded library needs no file
    fn.restype = None
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64]
    seed, step, start, n = 2**40 + 7, 2**31 + 3, 2**32 - 37, 75
    got = torch.empty((3, n), dtype=torch.float32)
    fn(seed, step, start, n, got.data_ptr(), n)
    want = np.empty((3, n), np.float32)
    _philox_passes(seed, step, start, [(start, 2**32), (2**32, start + n)], want)
    return fn if torch.equal(got, torch.from_numpy(want)) else False


_POOLS: dict = {}


def _thread_pool(n: int):
    """A pool of ``n`` threads, made once per size and process (a forked child has none of
    its parent's threads)."""
    key = (os.getpid(), n)
    if key not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="bnkernels-philox")
    return _POOLS[key]


def _philox_passes(seed: int, step: int, start: int, passes, out: np.ndarray) -> None:
    """Write r >> 8 of counters [first, end) into out[:, first - start : end - start] for each
    (first, end) of ``passes`` (see :func:`_philox_top_bits_cpu`)."""
    u64 = np.uint64
    mask, s32, s8 = u64(_M32), u64(32), u64(8)
    ra, rb = u64(_PHILOX_ROUND_A), u64(_PHILOX_ROUND_B)
    keys, k0, k1 = [], seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        keys.append((k0, k1))
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    step &= _M32
    pb1 = step * _PHILOX_ROUND_B  # round 1's c2 * B, the same for every counter
    m = max((end - first for first, end in passes), default=0)
    base = np.arange(m, dtype=u64)
    x0, x2, c1, c3, pa, pb = (np.empty(m, u64) for _ in range(6))
    for first, end in passes:
        lo, c = first - start, end - first  # where the pass writes, and its length
        X0, X2, C1, C3, PA, PB = (b[:c] for b in (x0, x2, c1, c3, pa, pb))
        np.add(base[:c], u64(first & _M32), out=X0)  # c0 = i mod 2^32; c1 = i >> 32 below
        # round 1: c1, c2, c3 scalars
        (k0, k1), hi = keys[0], first >> 32
        np.multiply(X0, ra, out=C3)  # pa (its low word is c3 from now on)
        s0, s1 = ((pb1 >> 32) ^ hi ^ k0) & _M32, pb1 & _M32  # c0, c1
        np.right_shift(C3, s32, out=X2)
        np.bitwise_xor(X2, u64(k1), out=X2)  # c2 = hi(pa) ^ 0 ^ k1
        # round 2: c0, c1 scalars
        k0, k1 = keys[1]
        pa2 = s0 * _PHILOX_ROUND_A
        np.multiply(X2, rb, out=C1)  # pb (its low word is c1 from now on)
        np.right_shift(C1, s32, out=X0)
        np.bitwise_xor(X0, u64(s1 ^ k0), out=X0)  # c0 = hi(pb) ^ c1 ^ k0
        np.bitwise_xor(C3, u64((pa2 >> 32) ^ k1), out=X2)
        np.bitwise_and(X2, mask, out=X2)  # c2 = hi(pa) ^ c3 ^ k1
        s3 = pa2 & _M32  # c3
        for r, (k0, k1) in enumerate(keys[2:], 3):  # rounds 3 to 10
            np.multiply(X0, ra, out=PA)
            np.multiply(X2, rb, out=PB)
            np.right_shift(PB, s32, out=X0)
            np.bitwise_xor(X0, C1, out=X0)
            np.bitwise_xor(X0, u64(k0), out=X0)
            np.bitwise_and(X0, mask, out=X0)
            np.right_shift(PA, s32, out=X2)
            if r == 3:  # c3 still the scalar s3
                np.bitwise_xor(X2, u64(s3 ^ k1), out=X2)
            else:
                np.bitwise_xor(X2, C3, out=X2)
                np.bitwise_xor(X2, u64(k1), out=X2)
                np.bitwise_and(X2, mask, out=X2)
            C1, PB, C3, PA = PB, C1, PA, C3
        np.right_shift(X0, s8, out=PA)
        out[0, lo:lo + c] = PA
        np.bitwise_and(C1, mask, out=PA)
        np.right_shift(PA, s8, out=PA)
        out[1, lo:lo + c] = PA
        np.right_shift(X2, s8, out=PA)
        out[2, lo:lo + c] = PA


def noisy_bn_noise_reference(x: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, m), fp32 with x's shape, for ``noise = (NoiseConfig, seed, step)``.

    Per channel j: mu_j ~ U(-n_mu, n_mu), sigma_j ~ U(1, n_sigma); per element:
    m ~ U(mu_j - r_mu, mu_j + r_mu), s ~ N(sigma_j, r_sigma). ``step`` may be an int or a
    1-element integer tensor (read without leaving the device).

    On the CPU the element words come from :func:`_philox_top_bits_cpu` (the same bits as
    :func:`philox4x32`, faster); every floating-point operation is the same either way, on
    whole tensors, in place."""
    cfg, seed, step = noise
    dev = x.device
    C = x.shape[1]
    n = x.numel()
    if isinstance(step, torch.Tensor):
        stp = step.reshape(()).to(device=dev, dtype=torch.int64) & _M32
    else:
        stp = torch.tensor(int(step) & _M32, device=dev, dtype=torch.int64)
    ch = torch.arange(C, device=dev, dtype=torch.int64)
    zero_c = torch.zeros_like(ch)
    q0, q1, _, _ = philox4x32(seed, ch, zero_c, zero_c + stp, zero_c + 1)
    mu = cfg.n_mu * (2.0 * _uniform(q0) - 1.0)
    sigma = 1.0 + (cfg.n_sigma - 1.0) * _uniform(q1)
    if dev.type == "cpu":
        u = _philox_top_bits_cpu(seed, n, int(stp))
    else:
        u = _philox_top_bits_torch(seed, n, stp, dev)
    u.add_(0.5).mul_(2.0**-24)  # _uniform's operations, in place
    u0, u1, u2 = u.unbind(0)
    per_channel = (1, C, 1)  # broadcast over the (N, C, S) view of the logical order
    # m = mu_j + r_mu (2 u0 - 1)
    N = x.shape[0]
    m = u0.mul_(2.0).sub_(1.0).mul_(cfg.r_mu).view(N, C, n // (N * C) if n else 0)
    m.add_(mu.view(per_channel))
    # s = sigma_j + r_sigma z, z = sqrt(-2 log u1) cos(2 pi u2) (Box-Muller)
    z = u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(6.283185307179586).cos_())
    s = z.mul_(cfg.r_sigma).view(m.shape).add_(sigma.view(per_channel))
    return s.reshape(x.shape), m.reshape(x.shape)


def _upstream(dy, x, mean, invstd, weight, bias, activation, noise):
    """(g, xhat) with g = dL/da, a = w * xhat + b, given dy = dL/dout (or, with a residual,
    the activation-masked dy and activation None: see :func:`residual_grad`)."""
    acc = acc_dtype(x.dtype)
    xhat = (x.to(acc) - _per_channel(mean.to(acc), x)) * _per_channel(invstd.to(acc), x)
    g = dy.to(acc)
    s = m = None
    if noise is not None:
        s, m = (t.to(acc) for t in noisy_bn_noise_reference(x, noise))
    if activation == "relu":
        out = _affine(xhat, weight, bias, x, acc)
        g = _relu_mask(g, out if s is None else (s * out).add_(m))
    if s is not None:
        g = g * s
    return g, xhat


def _dx_from(g, xhat, x, invstd, weight, mean_g=None, mean_gxhat=None):
    """dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat)); eval: the means are absent."""
    acc = g.dtype
    scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
    if mean_g is not None:
        g = g - _per_channel(mean_g, x) - xhat * _per_channel(mean_gxhat, x)
    return _like(g * _per_channel(scale, x), x)


def residual_grad(dy, out, activation):
    """d(residual) of out = act(... + residual): dy masked where a fused ReLU's output ``out``
    is <= 0 (as torch's threshold_backward: NaN passes), or dy itself. It is also what reaches
    the BatchNorm part: the backward then runs without the activation."""
    if activation == "relu":
        return _relu_mask(dy, out)
    return dy


def batch_norm_reference_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs,
                             noise=None):
    """Returns ``(dx, dweight, dbias)``, None where not needed (``needs`` = 3 booleans).

    ``mean``/``invstd`` are the saved batch statistics in training, and running_mean and
    1/sqrt(running_var + eps) in eval mode. With ``noise``, the gradient reaching a is
    s * dL/dout (the noise regenerated from its key, as the kernels do).
    """
    dims = _reduce_dims(x)
    g, xhat = _upstream(dy, x, mean, invstd, weight, bias, activation, noise)
    sum_g = g.sum(dims)
    sum_gxhat = (g * xhat).sum(dims)
    dx = dw = db = None
    if needs[0]:
        m = x.numel() // x.shape[1]
        means = (sum_g / m, sum_gxhat / m) if training else ()
        dx = _dx_from(g, xhat, x, invstd, weight, *means)
    if needs[1] and weight is not None:
        dw = sum_gxhat.to(weight.dtype)
    if needs[2] and bias is not None:
        db = sum_g.to(bias.dtype)
    return dx, dw, db


def batch_norm_reference_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None):
    """[sum(g), sum(g * (x - mean))] per channel ([2, C]), for SyncBatchNorm."""
    dims = _reduce_dims(x)
    g, xhat = _upstream(dy, x, mean, invstd, weight, bias, activation, noise)
    xmu = xhat / _per_channel(invstd.to(g.dtype), x)
    return torch.stack([g.sum(dims), (g * xmu).sum(dims)])


def batch_norm_reference_bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums, activation,
                                noise=None):
    """Training dx given [mean(g), mean(g * (x - mean))] over the whole batch."""
    g, xhat = _upstream(dy, x, mean, invstd, weight, bias, activation, noise)
    inv = invstd.to(g.dtype)
    return _dx_from(g, xhat, x, invstd, weight, mean_sums[0].to(g.dtype),
                    mean_sums[1].to(g.dtype) * inv)


# ----------------------------------------------------------------------------- l_p normalization
#
# Per channel, over its M values, with p in {1, 2, inf} (``math.inf``)::
#
#     mean = sum(x) / M
#     z    = x - mean  (centered)  or  x  (uncentered: the scale is taken before shifting the mean)
#     s    = sum|z| / M,   sqrt(sum z^2 / M),   max|z|              (p = 1, 2, inf)
#     a    = s + eps,   xhat = (x - mean) / a,   y = w * xhat + b
#
#     running_mean  <- momentum * mean + (1 - momentum) * running_mean
#     running_scale <- momentum * s    + (1 - momentum) * running_scale        (no unbiasing)
#
# Backward (training), g = dy. The scale's derivative is ds/dz_i = f_i / D with
#
#     p = 1:    f = sign(z),               D = M
#     p = 2:    f = z,                     D = M * s       (the term is 0 where s = 0)
#     p = inf:  f = sign(z) * [|z| = s],   D = #{i : |z_i| = s}
#
# (the l_inf tie rule: the gradient of the max is split equally among all values attaining
# max|z| in the channel, as torch.amax's; a unique maximum gets all of it), and::
#
#     dbias   = sum(g),   dweight = sum(g * xhat)
#     dx      = w / a * (g - dbias / M) - k3 * (f - k4),   k3 = w * dweight / (a * D)
#     k4      = sum(f) / M  if centered (z depends on x through the mean too), else 0
#
# Eval: running_mean and running_scale are constants, dx = w / a * g.


def _lp_scale(z: torch.Tensor, p, dims) -> torch.Tensor:
    """s_p of each channel of z: mean|z|, sqrt(mean z^2) or max|z| (NaN propagates)."""
    if p == 1:
        return z.abs().mean(dims)
    if p == 2:
        return (z * z).mean(dims).sqrt()
    return z.abs().amax(dims)


def _lp_direction(z: torch.Tensor, scale: torch.Tensor, p, dims, m: int):
    """(f, D) with ds/dz = f / D (see above); for l_inf, ties share the gradient equally."""
    if p == 1:
        return torch.sign(z), torch.full_like(scale, float(m))
    if p == 2:
        return z, m * scale
    at_max = z.abs() == _per_channel(scale, z)
    return torch.where(at_max, torch.sign(z), 0.0), at_max.sum(dims).to(scale.dtype)


def lp_norm_reference_fwd(x, p, running_mean, running_scale, weight, bias, training, momentum,
                          eps, centered):
    """Returns ``(y, save_mean, save_scale)``; updates the running buffers in place.

    ``p`` is 1, 2 or ``math.inf``. The saved scale is s_p itself (not 1/(s_p + eps)). In eval
    mode ``(y, None, None)``: the statistics are the running buffers.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    dims = _reduce_dims(x)
    if training:
        mean = xf.mean(dims)
        z = xf - _per_channel(mean, x) if centered else xf
        scale = _lp_scale(z, p, dims)
        if running_mean is not None:
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_scale.copy_(momentum * scale + (1 - momentum) * running_scale.to(acc))
        save = (mean, scale)
    else:
        mean = running_mean.to(acc)
        scale = running_scale.to(acc)
        save = (None, None)
    xhat = (xf - _per_channel(mean, x)) / _per_channel(scale + eps, x)
    return _like(_affine(xhat, weight, bias, x, acc), x), *save


def lp_norm_reference_bwd(dy, x, p, mean, scale, weight, bias, training, centered, eps, needs):
    """Returns ``(dx, dweight, dbias)``, None where not needed (``needs`` = 3 booleans).

    ``mean``/``scale`` are the saved batch mean and s_p in training, and running_mean and
    running_scale in eval mode.
    """
    acc = acc_dtype(x.dtype)
    dims = _reduce_dims(x)
    m = x.numel() // x.shape[1]
    xf = x.to(acc)
    mean, scale = mean.to(acc), scale.to(acc)
    a = scale + eps
    d = xf - _per_channel(mean, x)  # bit-identical to the forward's z when centered
    g = dy.to(acc)
    sum_g = g.sum(dims)
    sum_gxhat = (g * d).sum(dims) / a
    dx = dw = db = None
    if needs[0]:
        w = weight.to(acc) if weight is not None else torch.ones_like(a)
        if training:
            f, den = _lp_direction(d if centered else xf, scale, p, dims, m)
            safe = torch.where(den > 0, den, torch.ones_like(den))
            k3 = torch.where(den > 0, w * sum_gxhat / (a * safe), torch.zeros_like(den))
            k4 = f.sum(dims) / m if centered else torch.zeros_like(den)
            dxf = ((g - _per_channel(sum_g / m, x)) * _per_channel(w / a, x)
                   - _per_channel(k3, x) * (f - _per_channel(k4, x)))
        else:
            dxf = g * _per_channel(w / a, x)
        dx = _like(dxf, x)
    if needs[1] and weight is not None:
        dw = sum_gxhat.to(weight.dtype)
    if needs[2] and bias is not None:
        db = sum_g.to(bias.dtype)
    return dx, dw, db
