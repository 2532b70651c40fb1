"""BatchNorm in Triton: training/eval forward and backward, with optional fused ReLU and the
paper's noise (its split forward's and backward's elementwise passes are in :mod:`..noise`).

Every tensor is viewed as a 2-D, row-major *matrix* ``[ROWS, COLS]`` in one of two layouts
(see :func:`bnkernels.backends.triton.common.layout_of`):

* ``"ncs"`` -- NC(S)-contiguous input ``(N, C, *spatial)``: ROWS = N*C, COLS = S (product of the
  spatial dims). The channel of row ``r`` is ``r % C``.
* ``"mc"``  -- channels-last input (or ``(N, C)``): ROWS = M = N*S, COLS = C. The channel of
  column ``c`` is ``c``.

Per channel the statistics run over M = N*S values, around a shift: the channel's first element
K (x[0, c, 0, ...]). Each program keeps per-lane Welford summaries of x - K, merged with Chan's
formula, so a channel of mean 1e4 and std 1e-2 loses nothing to its mean; the mean is
K + mean(x - K), and the forward normalizes x - mean as (x - mean_hi) - mean_lo, the mean's
fp32 rounding error kept apart (TwoSum). Divisions and square roots that make the statistics
are correctly rounded (``div_rn``/``sqrt_rn``: Triton's fp32 ``/`` and ``sqrt`` are approximate
on NVIDIA GPUs, exact in the interpreter).

Special values follow torch: the lanes also keep a plain sum of x (one add per element), and a
channel whose sum and Welford summary are not finite (it holds a NaN or an infinity) gets the
sum as its mean (+inf, -inf, or NaN) and a NaN variance (:func:`_bn_finalize`).

Two strategies, chosen once per input signature by :class:`BatchNormPlan`:

* **fused** (a channel's values fit a program: M <= ``FUSED_MAX_VALUES``): one launch per
  direction. Forward (``_bn_fused_fwd_kernel``): one program per channel (or channel group,
  channels last) reduces its values, finalizes the statistics (saved mean/invstd, running
  statistics updated on the device) and writes y, re-reading its values from cache. Backward
  (``_bn_fused_bwd_kernel``): the same with the gradient sums and dx.
* **split**: two launches per direction. Forward: ``_bn_stats_kernel`` splits each channel
  over SPLIT programs, each writing a (count, mean, M2) partial to the plan's cached
  workspace; the last program of each channel to finish (an atomic ticket) merges the SPLIT
  partials in a fixed order and finalizes. Then the shared ``affine_apply_kernel``
  (:mod:`..affine`) writes y. Backward: ``_bn_split_bwd_kernel`` (partial sum(g),
  sum(g (x - mean)); the last program writes dweight, dbias and the coefficients of dx), then
  the shared ``affine_dx_kernel``.

Kernels are split by role, so each takes only the arguments its role reads: the statistics
kernel no y, residual, weight, bias or activation; the one-pass kernels no workspace. Noisy
BatchNorm (training only) keeps the launch counts: the one-pass kernels take its noise
optionally (``noise_ptr``, the seed and the step; None in a plain plan's variant) and
regenerate it where they read x; split, the forward is the statistics kernel and the noisy
apply kernel (:mod:`..noise`), the backward ``_bn_noisy_split_bwd_kernel`` (the split
reduction with the noise) and the noisy dx kernel.

The reduction kernels take both layouts, resolved at
compile time by their constexpr CL (channels last): "ncs", a program per channel, tiles
[BLOCK_N, BLOCK_S] of its (n, s) values; "mc", a program per group of BLOCK_C channels, tiles
[BLOCK_M, BLOCK_C] of the matrix (see the helpers ``group``, ``unit``, ``chan_*`` of
:mod:`..common`).

Eval: the forward is ``affine_apply_kernel`` alone (invstd = 1/sqrt(running_var + eps)
computed in the kernel); the backward is ``affine_dx_kernel`` alone, or, when dweight/dbias
are wanted, the reduction kernel writing dx in the same pass (one launch either way).

Backward formulas, with g = dL/da (a = w * xhat + b; g = dy times [out > 0] with the fused ReLU,
times the noise s when noisy)::

    dbias = sum(g),  dweight = sum(g * xhat)
    dx    = (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))) * invstd * w  (training)
    dx    = g * invstd * w                                                           (eval)

Merges are in a fixed order (never in the order programs finish), so one input always gives
bit-identical results. Statistics accumulate in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..affine import activate, bn_affine, count_batch, out_mask, relu_grad, res_load
from ..common import (
    chan_bcast,
    chan_get,
    chan_put,
    chan_sum,
    div_rn,
    group,
    last_of_group,
    put_partials,
    reduce_ids,
    sqrt_rn,
    two_sum_err,
    unit,
    unit_end,
    unit_loads,
)
from ..noise import chan_noise, load_step, noisy_grad, noisy_out, save_step, unit_noise

# Rows of partials in a split reduction's workspace ([count, mean, M2, sum] of the forward;
# the backward uses two): the per-channel results start at _WS_VEC * C * SPLIT.
_WS_ROWS = 4
_WS_VEC = tl.constexpr(_WS_ROWS)
# The noise's seed and step are never specialized on: a new step recompiles nothing.
_NOISE_NO_SPEC = ["seed", "step"]

# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b, ACC: tl.constexpr):
    """Chan et al.'s merge of two (mean, M2, count) summaries; empty summaries are neutral."""
    n = n_a + n_b
    frac = tl.where(n == 0, 0.0, div_rn(n_b, tl.where(n == 0, 1.0, n), ACC))
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


@triton.jit
def _welford_lanes_merge(mean, m2, cnt, axis: tl.constexpr, ACC: tl.constexpr):
    """Merge per-lane (mean, M2, count) along ``axis`` in one step (Chan's formula, k-way):
    n = sum n_l,  mean = sum n_l mean_l / n,  M2 = sum M2_l + sum n_l (mean_l - mean)^2.
    Plain sums, so it costs a few reductions, and deviations are taken from the merged mean,
    which keeps it stable."""
    n = tl.sum(cnt, axis)
    mean_t = div_rn(tl.sum(cnt * mean, axis), tl.maximum(n, 1.0), ACC)
    if axis == 0:
        d = mean - mean_t[None, :] if len(mean.shape) == 2 else mean - mean_t
    else:
        d = mean - mean_t[:, None]
    m2_t = tl.sum(m2 + cnt * d * d, axis)
    return mean_t, m2_t, n


@triton.jit
def _welford_chan(mean, m2, cnt, CL: tl.constexpr, ACC: tl.constexpr):
    """Per-channel merge of a reduction tile's lanes: over positions, then rows ("ncs"), or
    over the rows of each column (channels last)."""
    if CL:
        mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 0, ACC)
    else:
        mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 1, ACC)
        mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 0, ACC)
    return mean, m2, cnt


@triton.jit
def _welford_update(mean, m2, cnt, x, mask):
    """One Welford step per lane; masked lanes are left unchanged. (The lanes' running means
    may use the fast division: their rounding is of the order of Welford's own.)"""
    cnt = cnt + mask.to(cnt.dtype)
    delta = tl.where(mask, x - mean, 0.0)
    mean = mean + delta / tl.maximum(cnt, 1.0)
    m2 = m2 + delta * tl.where(mask, x - mean, 0.0)
    return mean, m2, cnt


@triton.jit
def _merge_partials(base, stride, SPLIT, mask, ACC: tl.constexpr):
    """Chan merge of SPLIT (count, mean, M2) partials at base + p, base + stride + p and
    base + 2 * stride + p, p = 0..SPLIT-1, in that order (deterministic), and the sum of
    their plain sums of x (at base + 3 * stride + p). Loads bypass L1: other programs wrote
    them."""
    n = tl.load(base, mask=mask, other=0.0, cache_modifier=".cg")
    mean = tl.load(base + stride, mask=mask, other=0.0, cache_modifier=".cg")
    m2 = tl.load(base + 2 * stride, mask=mask, other=0.0, cache_modifier=".cg")
    total = tl.load(base + 3 * stride, mask=mask, other=0.0, cache_modifier=".cg")
    for p in range(1, SPLIT):
        n_b = tl.load(base + p, mask=mask, other=0.0, cache_modifier=".cg")
        mean_b = tl.load(base + stride + p, mask=mask, other=0.0, cache_modifier=".cg")
        m2_b = tl.load(base + 2 * stride + p, mask=mask, other=0.0, cache_modifier=".cg")
        total += tl.load(base + 3 * stride + p, mask=mask, other=0.0, cache_modifier=".cg")
        mean, m2, n = _welford_combine(mean, m2, n, mean_b, m2_b, n_b, ACC)
    return mean, m2, n, total


@triton.jit
def _sum_partials(base, stride, SPLIT, mask):
    """Fixed-order sums of SPLIT partials at base + p and base + stride + p."""
    a = tl.load(base, mask=mask, other=0.0, cache_modifier=".cg")
    b = tl.load(base + stride, mask=mask, other=0.0, cache_modifier=".cg")
    for p in range(1, SPLIT):
        a += tl.load(base + p, mask=mask, other=0.0, cache_modifier=".cg")
        b += tl.load(base + stride + p, mask=mask, other=0.0, cache_modifier=".cg")
    return a, b


@triton.jit
def _not_finite(v):
    """True for +-inf and NaN."""
    return ~(tl.abs(v) < float("inf"))


@triton.jit
def _bn_finalize(ch, cm, mean_d, m2, cnt, shift, total, mean_ptr, invstd_ptr, rmean_ptr,
                 rvar_ptr, momentum, eps, ACC: tl.constexpr, OUT_VAR: tl.constexpr):
    """Statistics of channels ``ch`` from their merged (mean of x - shift, M2, count) and plain
    sum of x (``total``): stores the mean and invstd (or the biased var if OUT_VAR), updates the
    running statistics (unbiased variance) unless ``rmean_ptr`` is None; returns (mean_hi,
    mean_lo, invstd) with mean_hi the fp32 mean and mean_lo its rounding error.

    Special values, as torch: a channel holding a NaN or +-inf (its sum is not finite, and
    neither is its Welford summary) gets torch's mean sum(x) / M = the sum itself (+inf, -inf,
    or NaN for a NaN or both infinities) and a NaN variance, so its invstd, output and
    gradients are NaN too. Decided here, per channel: nothing in the loops but the sum."""
    var = div_rn(m2, tl.maximum(cnt, 1.0), ACC)
    hi = shift + mean_d
    lo = two_sum_err(shift, mean_d, hi)
    special = _not_finite(total) & (_not_finite(mean_d) | _not_finite(m2))
    hi = tl.where(special, total, hi)
    lo = tl.where(special, 0.0, lo)
    var = tl.where(special, float("nan"), var)
    invstd = div_rn(1.0, sqrt_rn(var + eps, ACC), ACC)
    tl.store(mean_ptr + ch, hi, mask=cm)
    if OUT_VAR:
        tl.store(invstd_ptr + ch, var, mask=cm)
    else:
        tl.store(invstd_ptr + ch, invstd, mask=cm)
    if rmean_ptr is not None:
        rm = tl.load(rmean_ptr + ch, mask=cm, other=0.0).to(ACC)
        rv = tl.load(rvar_ptr + ch, mask=cm, other=0.0).to(ACC)
        unbiased = tl.where(special, float("nan"), div_rn(m2, tl.maximum(cnt - 1.0, 1.0), ACC))
        rm = momentum * hi + (1.0 - momentum) * rm
        rv = momentum * unbiased + (1.0 - momentum) * rv
        tl.store(rmean_ptr + ch, rm.to(rmean_ptr.dtype.element_ty), mask=cm)
        tl.store(rvar_ptr + ch, rv.to(rvar_ptr.dtype.element_ty), mask=cm)
    return hi, lo, invstd


@triton.jit
def _shift(x_ptr, ch, cm, S, CL: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr):
    """The channels' first elements x[0, ch, 0, ...]: the shift of their statistics."""
    if CL:
        k = tl.load(x_ptr + ch, mask=cm, other=0.0)
    elif INT64:
        k = tl.load(x_ptr + ch.to(tl.int64) * S)
    else:
        k = tl.load(x_ptr + ch * S)
    return k.to(ACC)


@triton.jit
def _welford_pass(x_ptr, ch, cm, start, end, shift, N, C, S, S_BLOCKS, UNITS,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CL: tl.constexpr,
                  ACC: tl.constexpr, INT64: tl.constexpr, PAIR: tl.constexpr):
    """Per channel (mean of x - shift, M2, count, plain sum of x) over units start..end-1:
    per-lane Welford summaries merged at the end (:func:`_welford_chan`). PAIR: two units an
    iteration (:func:`~..common.unit_loads`); each lane still takes its units in order (the
    same bits)."""
    mean = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    m2 = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    cnt = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    total = tl.zeros([BLOCK_A, BLOCK_B], ACC)  # plain sum of x: tells special values apart
    for u in range(start, end, (2 if PAIR else 1) * (BLOCK_A if CL else 1)):
        x, mask, x2, mask2 = unit_loads(x_ptr, u, end, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A,
                                        BLOCK_B, CL, ACC, INT64, PAIR)
        total += x
        mean, m2, cnt = _welford_update(mean, m2, cnt, x - chan_bcast(shift, CL), mask)
        if PAIR:
            total += x2
            mean, m2, cnt = _welford_update(mean, m2, cnt, x2 - chan_bcast(shift, CL), mask2)
    mean, m2, cnt = _welford_chan(mean, m2, cnt, CL, ACC)
    return mean, m2, cnt, chan_sum(total, CL)


@triton.jit
def _bn_fwd_sweep(x_ptr, nbt_ptr, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A: tl.constexpr,
                  BLOCK_B: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                  INT64: tl.constexpr, ALIGN: tl.constexpr, PAIR: tl.constexpr):
    """The forward reductions' sweep: (C, S, pid, p, ch, cm, the channels' shift, and the
    per-channel Welford summary and plain sum of this program's CHUNK units); the first
    program counts the batch (``nbt_ptr``, unless None)."""
    C, S, pid, p = reduce_ids(C, S, ALIGN, CL, INT64)
    count_batch(nbt_ptr, (pid == 0) & (p == 0))
    ch, cm = group(pid, C, BLOCK_B, CL)
    shift = _shift(x_ptr, ch, cm, S, CL, ACC, INT64)
    mean, m2, cnt, total = _welford_pass(x_ptr, ch, cm, p * CHUNK,
                                         unit_end(p * CHUNK, CHUNK, UNITS, CL), shift, N, C, S,
                                         S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, ACC, INT64, PAIR)
    return C, S, pid, p, ch, cm, shift, mean, m2, cnt, total


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _bn_stats_kernel(
    x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    mean_ptr,  # [C] ACC out: mean
    invstd_ptr,  # [C] ACC out: 1/sqrt(biased var + eps), or the biased var if OUT_VAR
    rmean_ptr, rvar_ptr,  # [C] running statistics, updated in place (None: not tracked)
    ws_ptr,  # ACC workspace: [4, C, SPLIT] partials, then [C] mean_lo
    ticket_ptr,  # int32 [groups]: programs of each channel group done, reset by the last
    nbt_ptr,  # int64 [] num_batches_tracked, incremented once per call (None: no count)
    C, S, UNITS, CHUNK, SPLIT, N, S_BLOCKS, momentum, eps,
    BLOCK_A: tl.constexpr,  # tile rows: BLOCK_N ("ncs") or BLOCK_M (CL)
    BLOCK_B: tl.constexpr,  # tile columns: BLOCK_S ("ncs") or BLOCK_C, channels a program (CL)
    CL: tl.constexpr,  # channels last: x is (M, C); else (N, C, S), one channel a program
    OUT_VAR: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    PAIR: tl.constexpr = False,  # two units a loop iteration (bytes in flight; 4-byte x)
):
    """The split reduction's statistics: each of SPLIT programs per channel group reduces
    CHUNK units to a (count, mean, M2, sum) partial; the last to finish merges them in a
    fixed order and finalizes (mean, invstd or var, mean_lo into the workspace, running
    statistics)."""
    C, S, pid, p, ch, cm, shift, mean, m2, cnt, total = _bn_fwd_sweep(
        x_ptr, nbt_ptr, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A, BLOCK_B, CL, ACC, INT64, ALIGN,
        PAIR)
    put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL, cnt, mean, m2, total)
    if last_of_group(ticket_ptr, pid, SPLIT):
        mean, m2, cnt, total = _merge_partials(ws_ptr + ch * SPLIT, C * SPLIT, SPLIT, cm, ACC)
        _, lo, _ = _bn_finalize(ch, cm, mean, m2, cnt, shift, total, mean_ptr, invstd_ptr,
                                rmean_ptr, rvar_ptr, momentum, eps, ACC, OUT_VAR)
        chan_put(ws_ptr + _WS_VEC * C * SPLIT, ch, cm, lo, CL)
        tl.store(ticket_ptr + pid, 0)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_fused_fwd_kernel(
    x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    y_ptr,  # x's shape, out
    res_ptr,  # x's layout: the residual added before the activation (None: none)
    mean_ptr, invstd_ptr,  # [C] ACC out: mean, 1/sqrt(biased var + eps)
    rmean_ptr, rvar_ptr,  # [C] running statistics, updated in place (None: not tracked)
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    nbt_ptr,  # int64 [] num_batches_tracked, incremented once per call (None: no count)
    noise_ptr,  # fp32 [4]: noisy BatchNorm's n_mu, n_sigma, r_mu, r_sigma (None: no noise)
    seed, step,  # the noise's Philox key and step (an int or a 1-element int tensor)
    used_ptr,  # int64 [1]: gets the noise step used (None: not saved)
    C, S, UNITS,
    CHUNK,  # UNITS, rounded up to BLOCK_A channels last (the one program's units)
    N, S_BLOCKS, momentum, eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    PAIR: tl.constexpr = False,  # two units a loop iteration (bytes in flight; 4-byte x)
):
    """One program per channel group: reduces its values, finalizes the statistics and writes
    y = act(w * (x - mean) * invstd + b [+ residual]) (noisy: act(s * a + m [+ residual])),
    re-reading its values from cache. x - mean is (x - mean_hi) - mean_lo unless a ReLU
    follows without a residual (the backward then recomputes the output without mean_lo)."""
    C, S, pid, _, ch, cm, shift, mean, m2, cnt, total = _bn_fwd_sweep(  # (a grid of one split)
        x_ptr, nbt_ptr, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A, BLOCK_B, CL, ACC, INT64, ALIGN,
        PAIR)
    hi, lo, invstd = _bn_finalize(ch, cm, mean, m2, cnt, shift, total, mean_ptr, invstd_ptr,
                                  rmean_ptr, rvar_ptr, momentum, eps, ACC, False)
    w = chan_bcast(chan_get(w_ptr, ch, cm, 1.0, CL, ACC, w_ptr is not None), CL)
    b = chan_bcast(chan_get(b_ptr, ch, cm, 0.0, CL, ACC, b_ptr is not None), CL)
    if noise_ptr is not None:
        step = load_step(step)
        mu, sigma, r_mu, r_sigma = chan_noise(ch, seed, step, noise_ptr, CL)
        save_step(used_ptr, step, pid == 0)
    hi, lo, invstd = chan_bcast(hi, CL), chan_bcast(lo, CL), chan_bcast(invstd, CL)
    for u in range(0, UNITS, BLOCK_A if CL else 1):
        offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        r = res_load(res_ptr, offs, mask, ACC)
        a = bn_affine(x, hi, lo, invstd, w, b, res_ptr is not None or not RELU)
        if noise_ptr is not None:
            ns, nm = unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma, BLOCK_A,
                                CL, INT64)
            a = noisy_out(a, ns, nm)
        y = activate(a, r, res_ptr is not None, RELU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd, coef_ptr, dw_ptr, db_ptr, C, M,
                     ACC: tl.constexpr, DW_RAW: tl.constexpr):
    """dweight = sum(g (x - mean)) invstd (sum(g (x - mean)) itself if DW_RAW, for
    SyncBatchNorm), dbias = sum(g), and the coefficients of dx: k1 = mean(g),
    k2 = mean(g (x - mean)) invstd^2 (stored at coef_ptr unless None). dw_ptr, db_ptr: None
    where not wanted."""
    k1 = div_rn(sum_g, M, ACC)
    k2 = div_rn(sum_gx, M, ACC) * invstd * invstd
    if coef_ptr is not None:
        tl.store(coef_ptr + ch, k1, mask=cm)
        tl.store(coef_ptr + C + ch, k2, mask=cm)
    if dw_ptr is not None:
        if DW_RAW:
            tl.store(dw_ptr + ch, sum_gx.to(dw_ptr.dtype.element_ty), mask=cm)
        else:
            tl.store(dw_ptr + ch, (sum_gx * invstd).to(dw_ptr.dtype.element_ty), mask=cm)
    if db_ptr is not None:
        tl.store(db_ptr + ch, sum_g.to(db_ptr.dtype.element_ty), mask=cm)
    return k1, k2


@triton.jit
def _bn_bwd_g(g, x, mean, invstd, w, b, offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma,
              noise_ptr, BLOCK_A: tl.constexpr, CL: tl.constexpr, RELU: tl.constexpr,
              INT64: tl.constexpr):
    """g = dL/da of reduction unit ``u`` from its (masked) dy: the ReLU's mask on the
    recomputed output, and noisy BatchNorm's s (its noise regenerated: the channels' mu and
    sigma given) unless ``noise_ptr`` is None."""
    if noise_ptr is not None:
        ns, nm = unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma, BLOCK_A, CL,
                            INT64)
        g = noisy_grad(g, x, mean, invstd, w, b, ns, nm, RELU)
    else:
        g = relu_grad(g, x, mean, invstd, w, b, RELU)
    return g


@triton.jit
def _bn_bwd_sums(dy_ptr, x_ptr, dx_ptr, out_ptr, dres_ptr, noise_ptr, seed, step, ch, cm, start,
                 end, mean, invstd, w, b, N, C, S, S_BLOCKS, UNITS, BLOCK_A: tl.constexpr,
                 BLOCK_B: tl.constexpr, CL: tl.constexpr, RELU: tl.constexpr,
                 TRAINING: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr):
    """Per channel (sum(g), sum(g (x - mean))) over units start..end-1, g = dL/da; masks dy
    by the forward's output and writes d(residual) when ``out_ptr`` is given; in eval writes
    dx = g invstd w in the same pass (unless ``dx_ptr`` is None). Noisy (``noise_ptr``): g
    is s times the masked dy, the noise of (seed, step) regenerated."""
    mu, sigma, r_mu, r_sigma = 0.0, 1.0, 0.0, 0.0
    if noise_ptr is not None:
        mu, sigma, r_mu, r_sigma = chan_noise(ch, seed, step, noise_ptr, CL)
    sum_g = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    sum_gx = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for u in range(start, end, BLOCK_A if CL else 1):
        offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, INT64)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = out_mask(g, out_ptr, dres_ptr, offs, mask)  # the split dx pass reads dres as dy
        g = tl.where(mask, _bn_bwd_g(g, x, mean, invstd, w, b, offs, u, ch, mu, sigma, C, S,
                                     seed, step, r_mu, r_sigma, noise_ptr, BLOCK_A, CL, RELU,
                                     INT64), 0.0)
        sum_g += g
        sum_gx += g * tl.where(mask, x - mean, 0.0)
        if dx_ptr is not None and not TRAINING:  # eval: dx needs no sums
            tl.store(dx_ptr + offs, (g * invstd * w).to(dx_ptr.dtype.element_ty), mask=mask)
    return chan_sum(sum_g, CL), chan_sum(sum_gx, CL)


@triton.jit
def _bn_bwd_sweep(dy_ptr, x_ptr, dx_ptr, out_ptr, dres_ptr, mean_ptr, scale_ptr, w_ptr, b_ptr,
                  noise_ptr, seed, step, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A: tl.constexpr,
                  BLOCK_B: tl.constexpr, CL: tl.constexpr, RELU: tl.constexpr,
                  TRAINING: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                  ALIGN: tl.constexpr):
    """The first sweep of a backward reduction: (C, S, pid, p, ch, cm, invstd per channel,
    then mean, invstd, w, b broadcast against a tile, and this program's sum(g) and
    sum(g (x - mean)) over its CHUNK units, :func:`_bn_bwd_sums`; noisy where ``noise_ptr``
    is given, ``step`` then the step itself)."""
    C, S, pid, p = reduce_ids(C, S, ALIGN, CL, INT64)
    ch, cm = group(pid, C, BLOCK_B, CL)
    mean = chan_bcast(chan_get(mean_ptr, ch, cm, 0.0, CL, ACC), CL)
    invstd_c = chan_get(scale_ptr, ch, cm, 1.0, CL, ACC)
    invstd = chan_bcast(invstd_c, CL)
    w = chan_bcast(chan_get(w_ptr, ch, cm, 1.0, CL, ACC, w_ptr is not None), CL)
    b = chan_bcast(chan_get(b_ptr, ch, cm, 0.0, CL, ACC, b_ptr is not None), CL)
    sum_g, sum_gx = _bn_bwd_sums(dy_ptr, x_ptr, dx_ptr, out_ptr, dres_ptr, noise_ptr, seed, step,
                                 ch, cm, p * CHUNK, unit_end(p * CHUNK, CHUNK, UNITS, CL), mean,
                                 invstd, w, b, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                                 RELU, TRAINING, ACC, INT64)
    return C, S, pid, p, ch, cm, invstd_c, mean, invstd, w, b, sum_g, sum_gx


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_fused_bwd_kernel(
    dy_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    x_ptr,  # dy's layout
    dx_ptr,  # out (None: not wanted)
    out_ptr,  # dy's layout: the forward's output, for the ReLU's mask (None: no mask)
    dres_ptr,  # out, dy's layout: d(residual) = the masked dy (None: not wanted)
    mean_ptr,  # [C] mean (training) or the eval snapshot of running_mean
    scale_ptr,  # [C] invstd (training) or its eval snapshot
    w_ptr, b_ptr,  # [C] (None: absent)
    dw_ptr, db_ptr,  # [C] out, the weight's and bias's dtype (None: not wanted)
    noise_ptr,  # fp32 [4]: noisy BatchNorm's n_mu, n_sigma, r_mu, r_sigma (None: no noise)
    seed, step,  # the noise's Philox key and step (an int or a 1-element int tensor)
    C, S, UNITS,
    CHUNK,  # UNITS, rounded up to BLOCK_A channels last (the one program's units)
    N, S_BLOCKS,
    M_F,  # values per channel, as a float
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr, TRAINING: tl.constexpr, DW_RAW: tl.constexpr,
    RELU: tl.constexpr,  # recompute the output for the ReLU's mask
    ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
):
    """One program per channel group: the gradient sums, dweight/dbias, and dx (training: a
    second sweep, re-reading dy and x from cache; eval: in the first)."""
    if noise_ptr is not None:
        step = load_step(step)
    C, S, _, _, ch, cm, invstd_c, mean, invstd, w, b, sum_g, sum_gx = _bn_bwd_sweep(
        dy_ptr, x_ptr, dx_ptr, out_ptr, dres_ptr, mean_ptr, scale_ptr, w_ptr, b_ptr, noise_ptr,
        seed, step, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A, BLOCK_B, CL, RELU, TRAINING, ACC,
        INT64, ALIGN)
    k1, k2 = _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd_c, None, dw_ptr, db_ptr, C, M_F,
                              ACC, DW_RAW)
    if dx_ptr is not None and TRAINING:
        k1 = chan_bcast(k1, CL)
        k2 = chan_bcast(k2, CL)
        mu, sigma, r_mu, r_sigma = 0.0, 1.0, 0.0, 0.0
        if noise_ptr is not None:
            mu, sigma, r_mu, r_sigma = chan_noise(ch, seed, step, noise_ptr, CL)
        for u in range(0, UNITS, BLOCK_A if CL else 1):
            offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, INT64)
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = out_mask(g, out_ptr, None, offs, mask)  # re-read from cache
            g = _bn_bwd_g(g, x, mean, invstd, w, b, offs, u, ch, mu, sigma, C, S, seed, step,
                          r_mu, r_sigma, noise_ptr, BLOCK_A, CL, RELU, INT64)
            dx = (g - k1 - (x - mean) * k2) * invstd * w
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_split_bwd_kernel(
    dy_ptr, x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    dx_ptr,  # out: eval's dx, written in the pass (None: training, or not wanted)
    out_ptr, dres_ptr,  # as _bn_fused_bwd_kernel's: the split dx pass reads dres as its dy
    mean_ptr, scale_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,  # as _bn_fused_bwd_kernel's
    ws_ptr,  # ACC workspace: [2, C, SPLIT] partials, [2, C] coefficients at 4*C*SPLIT
    ticket_ptr,  # int32 [groups]
    C, S, UNITS, CHUNK, SPLIT, N, S_BLOCKS,
    M_F,  # values per channel, as a float
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr,
    TRAINING: tl.constexpr,  # the last program also writes dx's coefficients
    DW_RAW: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
):
    """SPLIT programs per channel group, each summing CHUNK units into a partial; the last
    to finish (an atomic ticket) adds them in a fixed order and writes dweight, dbias and, in
    training, the coefficients of dx (for the elementwise dx pass that follows)."""
    C, S, pid, p, ch, cm, invstd_c, _, _, _, _, sum_g, sum_gx = _bn_bwd_sweep(
        dy_ptr, x_ptr, dx_ptr, out_ptr, dres_ptr, mean_ptr, scale_ptr, w_ptr, b_ptr, None, None,
        None, C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A, BLOCK_B, CL, RELU, TRAINING, ACC, INT64,
        ALIGN)
    put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL, sum_g, sum_gx)
    if last_of_group(ticket_ptr, pid, SPLIT):
        sum_g, sum_gx = _sum_partials(ws_ptr + ch * SPLIT, C * SPLIT, SPLIT, cm)
        _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd_c,
                         ws_ptr + _WS_VEC * C * SPLIT if TRAINING else None, dw_ptr, db_ptr, C,
                         M_F, ACC, DW_RAW)
        tl.store(ticket_ptr + pid, 0)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_noisy_split_bwd_kernel(
    dy_ptr, x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    out_ptr, dres_ptr,  # as _bn_fused_bwd_kernel's: the dx pass reads dres as its dy
    mean_ptr, scale_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,  # as _bn_fused_bwd_kernel's
    ws_ptr,  # ACC workspace: [2, C, SPLIT] partials, [2, C] coefficients at 4*C*SPLIT
    ticket_ptr,  # int32 [groups]
    noise_ptr,  # fp32 [4]: n_mu, n_sigma, r_mu, r_sigma
    seed, step,  # the noise's Philox key and step (an int or a 1-element int tensor)
    C, S, UNITS, CHUNK, SPLIT, N, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr, DW_RAW: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
):
    """Noisy BatchNorm's split backward reduction: :func:`_bn_split_bwd_kernel` with g = s
    times the masked dy (the noise regenerated), in training (noisy BatchNorm trains only):
    the last program writes dx's coefficients for the noisy dx pass
    (:func:`..noise.noisy_dx_kernel`), which regenerates the noise too. No dx in this pass
    and no TRAINING flag; M = N * S is converted here as the host converts M_F (int to fp32,
    one rounding)."""
    C, S, pid, p, ch, cm, invstd_c, _, _, _, _, sum_g, sum_gx = _bn_bwd_sweep(
        dy_ptr, x_ptr, None, out_ptr, dres_ptr, mean_ptr, scale_ptr, w_ptr, b_ptr, noise_ptr,
        seed, load_step(step), C, S, UNITS, CHUNK, N, S_BLOCKS, BLOCK_A, BLOCK_B, CL, RELU, True,
        ACC, INT64, ALIGN)
    put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL, sum_g, sum_gx)
    if last_of_group(ticket_ptr, pid, SPLIT):
        sum_g, sum_gx = _sum_partials(ws_ptr + ch * SPLIT, C * SPLIT, SPLIT, cm)
        m_f = (tl.cast(N, tl.int64) * S).to(tl.float32)
        _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd_c, ws_ptr + _WS_VEC * C * SPLIT, dw_ptr,
                         db_ptr, C, m_f, ACC, DW_RAW)
        tl.store(ticket_ptr + pid, 0)
