"""BatchNorm in Triton: training/eval forward and backward, with optional fused ReLU.

Every tensor is viewed as a 2-D, row-major *matrix* ``[ROWS, COLS]`` in one of two layouts
(see :func:`bnkernels.backends.triton.common.view_layout`):

* ``"ncs"`` -- NC(S)-contiguous input ``(N, C, *spatial)``: ROWS = N*C, COLS = S (product of the
  spatial dims). The channel of row ``r`` is ``r % C``.
* ``"mc"``  -- channels-last input (or ``(N, C)``): ROWS = M = N*S, COLS = C. The channel of
  column ``c`` is ``c``.

Per channel the statistics run over M = N*S values. The pipeline is

forward (training)::

    _bn_stats_{ncs,mc}_kernel   split reduction: per-lane Welford, k-way Chan merge of the lanes;
                                one (count, mean, M2) partial per (channel, split)
    _bn_stats_finalize_kernel   Chan merge of the splits in a fixed order -> mean, invstd (saved);
                                running_mean/running_var updated in place (no host sync)
    _bn_apply_kernel            y = (x - mean) * invstd * w + b  (+ ReLU)

forward (eval): ``_bn_apply_kernel`` alone, with invstd = 1/sqrt(running_var + eps) computed in
the kernel.

backward::

    _bn_bwd_reduce_{ncs,mc}_kernel   partial sum(g) and sum(g * (x - mean)) per (channel, split),
                                     g = dy (or dy * [y > 0] with the fused ReLU, y recomputed)
    _bn_bwd_finalize_kernel          fixed-order sum of the splits -> dweight, dbias and the
                                     per-channel coefficients of dx
    _bn_bwd_dx_kernel                training: dx = (g - sum_g/M - (x-mean)*invstd^2*sum_gxmu/M)
                                                     * invstd * w
                                     eval:     dx = g * invstd * w

Reductions are split over many programs per channel and merged in a fixed order, so one input
always gives bit-identical results. Statistics accumulate in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    acc_dtype,
    apply_config,
    as_layout,
    bcast,
    chan_load,
    ncs_unit,
    reduce_config,
    sum_all,
    tile,
    tl_dtype,
    view_layout,
)
from .noise import channel_noise, element_noise, load_step, noise_args

# Noisy BatchNorm (Algorithm 1 of the paper) runs through the same kernels with NOISY=True:
# out = act(s * a + m), a = w * xhat + b, with (s, m) regenerated in-kernel by .noise from
# (seed, step, logical element index). Seed and step are never specialized on, so a new step
# does not recompile anything.
_NOISE_NO_SPEC = ["seed", "step_val"]

# ----------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) summaries; empty summaries are neutral."""
    n = n_a + n_b
    frac = tl.where(n == 0, 0.0, n_b / tl.where(n == 0, 1.0, n))
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


@triton.jit
def _welford_lanes_merge(mean, m2, cnt, axis: tl.constexpr):
    """Merge per-lane (mean, M2, count) along ``axis`` in one step (Chan's formula, k-way):
    n = sum n_l,  mean = sum n_l mean_l / n,  M2 = sum M2_l + sum n_l (mean_l - mean)^2.
    Plain sums, so it costs a few reductions (a pairwise tl.reduce tree is far slower in the
    interpreter) and deviations are taken from the merged mean, which keeps it stable."""
    n = tl.sum(cnt, axis)
    mean_t = tl.sum(cnt * mean, axis) / tl.maximum(n, 1.0)
    if axis == 0:
        d = mean - mean_t[None, :] if len(mean.shape) == 2 else mean - mean_t
    else:
        d = mean - mean_t[:, None]
    m2_t = tl.sum(m2 + cnt * d * d, axis)
    return mean_t, m2_t, n


@triton.jit
def _welford_update(mean, m2, cnt, x, mask):
    """One Welford step per lane; masked lanes are left unchanged."""
    cnt = cnt + mask.to(cnt.dtype)
    delta = tl.where(mask, x - mean, 0.0)
    mean = mean + delta / tl.maximum(cnt, 1.0)
    m2 = m2 + delta * tl.where(mask, x - mean, 0.0)
    return mean, m2, cnt


@triton.jit
def _upstream_grad(g, x, mean, invstd, w, b, s, m, RELU: tl.constexpr, NOISY: tl.constexpr):
    """dL/da for a = w * xhat + b, given g = dL/dout, out = act(s * a + m) or act(a).

    With the fused ReLU the output is recomputed exactly as the forward computed it and, like
    torch's threshold_backward, the gradient is dropped where out <= 0 (so NaN passes)."""
    if RELU:
        out = (x - mean) * invstd * w + b
        if NOISY:
            out = s * out + m
        g = tl.where(out <= 0.0, 0.0, g)
    if NOISY:
        g = g * s
    return g


@triton.jit
def _logical_index_mc(rows, cols, C, S):
    """NCHW-logical index of element (row = n*S + s, channel col) of a channels-last tensor."""
    n = rows // S
    return (n[:, None] * C + cols[None, :]) * S + (rows - n * S)[:, None]


@triton.jit
def _tile_noise(rows, cols, ch, offs, C, S, seed, step_ptr, step_val, n_mu, n_sigma, r_mu,
                r_sigma, CHAN_ON_ROWS: tl.constexpr, STEP_PTR: tl.constexpr,
                INT64: tl.constexpr):
    """(s, m) of the elements of an elementwise tile (see .noise)."""
    step = load_step(step_ptr, step_val, STEP_PTR)
    mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
    if CHAN_ON_ROWS:
        idx = offs
    else:
        idx = _logical_index_mc(rows, cols, C, S)
    return element_noise(idx, bcast(mu, CHAN_ON_ROWS), bcast(sigma, CHAN_ON_ROWS), seed, step,
                         r_mu, r_sigma, INT64)


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _bn_stats_ncs_kernel(
    x_ptr,  # (N, C, S) contiguous
    part_ptr,  # [3, C, SPLIT] ACC: count, mean, M2 of each split
    C,
    S,
    N,
    S_BLOCKS,  # position blocks per batch-row block
    UNITS,  # [BLOCK_N, BLOCK_S] tiles per channel
    CHUNK,  # tiles per split
    SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    mean = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    cnt = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for u in range(p * CHUNK, tl.minimum(p * CHUNK + CHUNK, UNITS)):
        offs, mask = ncs_unit(c, u, N, C, S, S_BLOCKS, BLOCK_N, BLOCK_S, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean, m2, cnt = _welford_update(mean, m2, cnt, x, mask)
    mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 1)  # over positions, then rows
    mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 0)
    out = part_ptr + c * SPLIT + p
    tl.store(out, cnt)
    tl.store(out + C * SPLIT, mean)
    tl.store(out + 2 * C * SPLIT, m2)


@triton.jit
def _bn_stats_mc_kernel(
    x_ptr,  # (M, C) contiguous (channels last)
    part_ptr,  # [3, C, SPLIT] ACC
    C,
    S,  # spatial size (unused here; the same signature as the other reductions)
    M,
    CHUNK,  # rows per split (a multiple of BLOCK_M)
    SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    pc = tl.program_id(0)
    p = tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for off in range(0, CHUNK, BLOCK_M):
        rows = p * CHUNK + off + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean, m2, cnt = _welford_update(mean, m2, cnt, x, mask)
    mean, m2, cnt = _welford_lanes_merge(mean, m2, cnt, 0)
    out = part_ptr + cols * SPLIT + p
    tl.store(out, cnt, mask=cmask)
    tl.store(out + C * SPLIT, mean, mask=cmask)
    tl.store(out + 2 * C * SPLIT, m2, mask=cmask)


@triton.jit
def _bn_stats_finalize_kernel(
    part_ptr,  # [3, C, SPLIT] ACC partials
    mean_ptr,  # [C] ACC out: batch mean
    invstd_ptr,  # [C] ACC out: 1 / sqrt(biased var + eps), or the biased var if OUT_VAR
    rmean_ptr,  # [C] running_mean (any float dtype), updated in place if UPDATE
    rvar_ptr,  # [C] running_var, updated in place with the unbiased variance if UPDATE
    C,
    SPLIT,
    momentum,
    eps,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
    UPDATE: tl.constexpr,
    OUT_VAR: tl.constexpr,  # write var (for a merge across devices) instead of invstd
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    for p in range(0, SPLIT):  # fixed order: deterministic
        base = part_ptr + cols * SPLIT + p
        n_b = tl.load(base, mask=cmask, other=0.0)
        mean_b = tl.load(base + C * SPLIT, mask=cmask, other=0.0)
        m2_b = tl.load(base + 2 * C * SPLIT, mask=cmask, other=0.0)
        mean, m2, cnt = _welford_combine(mean, m2, cnt, mean_b, m2_b, n_b)
    var = m2 / tl.maximum(cnt, 1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, var if OUT_VAR else invstd, mask=cmask)
    if UPDATE:
        rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(ACC)
        rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(ACC)
        unbiased = m2 / tl.maximum(cnt - 1.0, 1.0)
        rm = momentum * mean + (1.0 - momentum) * rm
        rv = momentum * unbiased + (1.0 - momentum) * rv
        tl.store(rmean_ptr + cols, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + cols, rv.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_apply_kernel(
    x_ptr,  # [ROWS, COLS] contiguous
    y_ptr,  # [ROWS, COLS] out, x's dtype
    mean_ptr,  # [C]
    scale_ptr,  # [C] invstd, or running_var if FROM_VAR
    w_ptr,  # [C] or dummy
    b_ptr,  # [C] or dummy
    step_ptr,  # noise step (a 1-element tensor) if STEP_PTR
    ROWS,
    COLS,
    C,
    S,
    eps,
    seed,  # noise: Philox key
    step_val,  # noise: step, if not STEP_PTR
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,  # "ncs" layout: channel = row % C; else channel = column
    FROM_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    scale = chan_load(scale_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC)
    if FROM_VAR:
        scale = 1.0 / tl.sqrt(scale + eps)
    w = chan_load(w_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC, HAS_W)
    b = chan_load(b_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, HAS_B)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = (x - mean) * scale * w + b
    if NOISY:
        ns, nm = _tile_noise(rows, cols, ch, offs, C, S, seed, step_ptr, step_val, n_mu,
                             n_sigma, r_mu, r_sigma, CHAN_ON_ROWS, STEP_PTR, INT64)
        y = ns * y + nm
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN propagates, as torch.relu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_bwd_reduce_ncs_kernel(
    dy_ptr,  # (N, C, S) contiguous
    x_ptr,  # (N, C, S) contiguous
    mean_ptr,  # [C] ACC
    invstd_ptr,  # [C] ACC
    w_ptr,
    b_ptr,
    step_ptr,
    seed,
    step_val,
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    part_ptr,  # [2, C, SPLIT] ACC: sum(g), sum(g * (x - mean)), g = dL/da
    C,
    S,
    N,
    S_BLOCKS,  # position blocks per batch-row block
    UNITS,  # [BLOCK_N, BLOCK_S] tiles per channel
    CHUNK,  # tiles per split
    SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    mu = 0.0
    sigma = 1.0
    step = 0
    if NOISY:
        step = load_step(step_ptr, step_val, STEP_PTR)
        mu, sigma = channel_noise(c, seed, step, n_mu, n_sigma)
    mean = tl.load(mean_ptr + c).to(ACC)
    invstd = tl.load(invstd_ptr + c).to(ACC)
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(w_ptr + c).to(ACC)
    if HAS_B:
        b = tl.load(b_ptr + c).to(ACC)
    sum_g = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_gx = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for u in range(p * CHUNK, tl.minimum(p * CHUNK + CHUNK, UNITS)):
        offs, mask = ncs_unit(c, u, N, C, S, S_BLOCKS, BLOCK_N, BLOCK_S, INT64)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        ns = 1.0
        nm = 0.0
        if NOISY:
            ns, nm = element_noise(offs, mu, sigma, seed, step, r_mu, r_sigma, INT64)
        g = _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY)
        g = tl.where(mask, g, 0.0)
        sum_g += g
        sum_gx += g * tl.where(mask, x - mean, 0.0)
    out = part_ptr + c * SPLIT + p
    tl.store(out, sum_all(sum_g))
    tl.store(out + C * SPLIT, sum_all(sum_gx))


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_bwd_reduce_mc_kernel(
    dy_ptr,  # (M, C) contiguous
    x_ptr,
    mean_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    step_ptr,
    seed,
    step_val,
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    part_ptr,  # [2, C, SPLIT] ACC
    C,
    S,
    M,
    CHUNK,
    SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    pc = tl.program_id(0)
    p = tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = 0.0
    sigma = 1.0
    step = 0
    if NOISY:
        step = load_step(step_ptr, step_val, STEP_PTR)
        mu, sigma = channel_noise(cols, seed, step, n_mu, n_sigma)
        mu, sigma = mu[None, :], sigma[None, :]
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)[None, :]
    else:
        w = 1.0
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    else:
        b = 0.0
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for off in range(0, CHUNK, BLOCK_M):
        rows = p * CHUNK + off + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        ns = 1.0
        nm = 0.0
        if NOISY:
            idx = _logical_index_mc(rows, cols, C, S)
            ns, nm = element_noise(idx, mu, sigma, seed, step, r_mu, r_sigma, INT64)
        g = _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY)
        g = tl.where(mask, g, 0.0)
        sum_g += g
        sum_gx += g * tl.where(mask, x - mean, 0.0)
    out = part_ptr + cols * SPLIT + p
    tl.store(out, tl.sum(sum_g, 0), mask=cmask)
    tl.store(out + C * SPLIT, tl.sum(sum_gx, 0), mask=cmask)


@triton.jit
def _bn_bwd_finalize_kernel(
    part_ptr,  # [2, C, SPLIT] ACC
    invstd_ptr,  # [C] ACC
    coef_ptr,  # [2, C] ACC out: mean(g), mean(g * (x - mean)) (sums times inv_m)
    dw_ptr,  # [C] out (weight's dtype): sum(g * xhat)
    db_ptr,  # [C] out (bias's dtype): sum(g)
    C,
    SPLIT,
    inv_m,  # 1 / M
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
    WRITE_COEF: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for p in range(0, SPLIT):  # fixed order: deterministic
        sum_g += tl.load(part_ptr + cols * SPLIT + p, mask=cmask, other=0.0)
        sum_gx += tl.load(part_ptr + C * SPLIT + cols * SPLIT + p, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    if WRITE_COEF:
        tl.store(coef_ptr + cols, sum_g * inv_m, mask=cmask)
        tl.store(coef_ptr + C + cols, sum_gx * inv_m, mask=cmask)
    if WRITE_DW:
        tl.store(dw_ptr + cols, (sum_gx * invstd).to(dw_ptr.dtype.element_ty), mask=cmask)
    if WRITE_DB:
        tl.store(db_ptr + cols, sum_g.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_bwd_dx_kernel(
    dy_ptr,  # [ROWS, COLS] contiguous, same layout as x
    x_ptr,
    dx_ptr,  # out, x's dtype
    mean_ptr,  # [C] ACC
    invstd_ptr,  # [C] ACC
    w_ptr,
    b_ptr,
    coef_ptr,  # [2, C] ACC (training only): mean(g), mean(g * (x - mean)) over the batch
    step_ptr,
    ROWS,
    COLS,
    C,
    S,
    seed,
    step_val,
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    invstd = chan_load(invstd_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    w = chan_load(w_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC, HAS_W)
    b = chan_load(b_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, HAS_B)
    k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, TRAINING)
    k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC, TRAINING) * invstd * invstd
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    ns = 1.0
    nm = 0.0
    if NOISY:
        ns, nm = _tile_noise(rows, cols, ch, offs, C, S, seed, step_ptr, step_val, n_mu,
                             n_sigma, r_mu, r_sigma, CHAN_ON_ROWS, STEP_PTR, INT64)
    g = _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY)
    if TRAINING:
        dx = (g - k1 - (x - mean) * k2) * invstd * w
    else:
        dx = g * invstd * w
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _partials(kernel_ncs, kernel_mc, lay, n_out, acc, args, kwargs):
    """Launch one split-reduction kernel over ``lay``; returns the [n_out, C, SPLIT] partials.

    ``args`` are the kernel's leading arguments (before ``part_ptr``)."""
    cfg = reduce_config(lay)
    part = torch.empty((n_out, lay.C, cfg.split), device=lay.device, dtype=acc)
    common = dict(ACC=tl_dtype(acc), INT64=lay.int64, num_warps=cfg.num_warps, **kwargs)
    if lay.kind == "ncs":
        kernel_ncs[(lay.C, cfg.split)](
            *args, part, lay.C, lay.S, lay.N, cfg.s_blocks, cfg.units, cfg.chunk, cfg.split,
            BLOCK_N=cfg.block_n, BLOCK_S=cfg.block_s, **common)
    else:
        kernel_mc[(triton.cdiv(lay.C, cfg.block_c), cfg.split)](
            *args, part, lay.C, lay.S, lay.M, cfg.chunk, cfg.split,
            BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, **common)
    return part


def _elementwise_grid(lay):
    cfg = apply_config(lay)
    grid = (triton.cdiv(lay.rows, cfg.block_r), triton.cdiv(lay.cols, cfg.block_k))
    return grid, dict(BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)


def _split_noise(noise, dummy):
    """Noise kernel arguments split into (step_ptr, scalar args, constexpr flags)."""
    a = noise_args(noise, dummy)
    scalars = dict(seed=a["seed"], step_val=a["step_val"], n_mu=a["n_mu"],
                   n_sigma=a["n_sigma"], r_mu=a["r_mu"], r_sigma=a["r_sigma"])
    return a["step_ptr"], scalars, dict(NOISY=a["NOISY"], STEP_PTR=a["STEP_PTR"])


def _stats(lay, acc, running_mean=None, running_var=None, momentum=0.0, eps=0.0,
           out_var=False):
    """Per-channel batch mean and invstd (or biased var); updates running buffers if given."""
    part = _partials(_bn_stats_ncs_kernel, _bn_stats_mc_kernel, lay, 3, acc, (lay.tensor,), {})
    mean = torch.empty(lay.C, device=lay.device, dtype=acc)
    second = torch.empty(lay.C, device=lay.device, dtype=acc)
    update = running_mean is not None
    block_c = min(triton.next_power_of_2(lay.C), 1024)
    _bn_stats_finalize_kernel[(triton.cdiv(lay.C, block_c),)](
        part, mean, second,
        running_mean if update else mean, running_var if update else second,
        lay.C, part.shape[2], float(momentum), float(eps),
        BLOCK_C=block_c, ACC=tl_dtype(acc), UPDATE=update, OUT_VAR=out_var,
    )
    return mean, second


def _apply(lay, acc, stat_a, stat_b, weight, bias, eps, from_var, activation, noise):
    xc = lay.tensor
    y = torch.empty_like(xc)
    step_ptr, noise_scalars, noise_flags = _split_noise(noise, xc)
    grid, meta = _elementwise_grid(lay)
    _bn_apply_kernel[grid](
        xc, y, stat_a, stat_b,
        weight if weight is not None else xc, bias if bias is not None else xc, step_ptr,
        lay.rows, lay.cols, lay.C, lay.S, float(eps), **noise_scalars,
        CHAN_ON_ROWS=lay.kind == "ncs", FROM_VAR=from_var,
        HAS_W=weight is not None, HAS_B=bias is not None, RELU=activation == "relu",
        ACC=tl_dtype(acc), INT64=lay.int64, **noise_flags, **meta,
    )
    return lay.restore(y)


def batch_norm_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, noise=None):
    """Forward BatchNorm; returns ``(y, save_mean, save_invstd)``.

    In training the saved statistics are the batch mean and 1/sqrt(biased var + eps), in fp32
    (fp64 for fp64 x), and the running buffers (if given) are updated in place on the device.
    In eval mode the running statistics are used and ``(y, None, None)`` is returned.
    ``noise = (NoiseConfig, seed, step)`` turns it into noisy BatchNorm: y = act(s * a + m).
    Arguments are validated by :mod:`bnkernels.functional`.
    """
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    if training:
        mean, invstd = _stats(lay, acc, running_mean, running_var, momentum, eps)
        y = _apply(lay, acc, mean, invstd, weight, bias, eps, False, activation, noise)
        return y, mean, invstd
    y = _apply(lay, acc, running_mean, running_var, weight, bias, eps, True, activation, noise)
    return y, None, None


# Stages, for SyncBatchNorm (statistics and gradient sums merged across processes in between).


def batch_norm_stats(x):
    """Per-channel (mean, biased var) of x over the batch and spatial dims, fp32/fp64."""
    lay = view_layout(x)
    return _stats(lay, acc_dtype(x.dtype), out_var=True)


def batch_norm_apply(x, mean, invstd, weight, bias, activation, noise=None):
    """y = act(w * (x - mean) * invstd + b) with given per-channel statistics."""
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    return _apply(lay, acc, mean.to(acc).contiguous(), invstd.to(acc).contiguous(), weight,
                  bias, 0.0, False, activation, noise)


def _grad_sums(lay, acc, dyc, mean, invstd, weight, bias, activation, noise, inv_m,
               need_coef, need_dw, need_db):
    """Split reduction of g = dL/da: writes [mean(g), mean(g (x - mean))] (sums * inv_m) and
    dweight = sum(g xhat), dbias = sum(g) as asked."""
    step_ptr, noise_scalars, noise_flags = _split_noise(noise, invstd)
    w_arg = weight if weight is not None else invstd
    b_arg = bias if bias is not None else invstd
    part = _partials(
        _bn_bwd_reduce_ncs_kernel, _bn_bwd_reduce_mc_kernel, lay, 2, acc,
        (dyc, lay.tensor, mean, invstd, w_arg, b_arg, step_ptr, *noise_scalars.values()),
        dict(HAS_W=weight is not None, HAS_B=bias is not None, RELU=activation == "relu",
             **noise_flags),
    )
    coef = torch.empty((2, lay.C), device=lay.device, dtype=acc) if need_coef else invstd
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    block_c = min(triton.next_power_of_2(lay.C), 1024)
    _bn_bwd_finalize_kernel[(triton.cdiv(lay.C, block_c),)](
        part, invstd, coef, dw if need_dw else invstd, db if need_db else invstd,
        lay.C, part.shape[2], float(inv_m),
        BLOCK_C=block_c, ACC=tl_dtype(acc),
        WRITE_COEF=need_coef, WRITE_DW=need_dw, WRITE_DB=need_db,
    )
    return (coef if need_coef else None), dw, db


def _dx(lay, acc, dyc, mean, invstd, weight, bias, coef, training, activation, noise):
    step_ptr, noise_scalars, noise_flags = _split_noise(noise, invstd)
    dxc = torch.empty_like(lay.tensor)
    grid, meta = _elementwise_grid(lay)
    _bn_bwd_dx_kernel[grid](
        dyc, lay.tensor, dxc, mean, invstd,
        weight if weight is not None else invstd, bias if bias is not None else invstd,
        coef if coef is not None else invstd, step_ptr,
        lay.rows, lay.cols, lay.C, lay.S, **noise_scalars,
        CHAN_ON_ROWS=lay.kind == "ncs", TRAINING=training,
        HAS_W=weight is not None, HAS_B=bias is not None, RELU=activation == "relu",
        ACC=tl_dtype(acc), INT64=lay.int64, **noise_flags, **meta,
    )
    return lay.restore(dxc)


def batch_norm_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs, noise=None):
    """Backward BatchNorm; returns ``(dx, dweight, dbias)`` (None where ``needs`` says so).

    ``mean``/``invstd`` are the saved batch statistics in training, and running_mean and
    1/sqrt(running_var + eps) in eval mode. ``noise`` as in :func:`batch_norm_fwd` (the noise
    is regenerated, not stored).
    """
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    dyc = as_layout(dy, lay)
    mean = mean.to(acc).contiguous()
    invstd = invstd.to(acc).contiguous()
    coef = dw = db = None
    need_coef = training and need_dx
    if need_coef or need_dw or need_db:
        coef, dw, db = _grad_sums(lay, acc, dyc, mean, invstd, weight, bias, activation, noise,
                                  1.0 / lay.M, need_coef, need_dw, need_db)
    dx = None
    if need_dx:
        dx = _dx(lay, acc, dyc, mean, invstd, weight, bias, coef, training, activation, noise)
    return dx, dw, db


def batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None):
    """Per-channel sums [sum(g), sum(g * (x - mean))] ([2, C], fp32/fp64) for SyncBatchNorm."""
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    coef, _, _ = _grad_sums(lay, acc, as_layout(dy, lay), mean.to(acc).contiguous(),
                            invstd.to(acc).contiguous(), weight, bias, activation, noise, 1.0,
                            True, False, False)
    return coef


def batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias, mean_sums, activation, noise=None):
    """Training dx given ``mean_sums`` = [mean(g), mean(g * (x - mean))] over the whole
    (possibly multi-process) batch."""
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    return _dx(lay, acc, as_layout(dy, lay), mean.to(acc).contiguous(),
               invstd.to(acc).contiguous(), weight, bias, mean_sums.to(acc).contiguous(), True,
               activation, noise)
