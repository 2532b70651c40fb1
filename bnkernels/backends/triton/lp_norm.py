"""l_p normalization (p in {1, 2, inf}) in Triton: training/eval forward and backward.

Per channel, over its M = N * S values (the layouts are BatchNorm's, see
:mod:`bnkernels.backends.triton.batch_norm` and :func:`~.common.view_layout`)::

    mean = sum(x) / M
    z    = x - mean  (centered)  or  x  (uncentered: the scale is taken "before shifting the mean")
    s_1 = sum|z| / M,   s_2 = sqrt(sum z^2 / M),   s_inf = max|z|
    y    = w * (x - mean) / (s + eps) + b

The pipeline is

forward (training)::

    _lp_stats_{ncs,mc}_kernel   split reduction: one partial sum(x) and one partial stat(z)
                                (sum|z|, sum z^2 or max|z|) per (channel, split)
    _lp_stats_finalize_kernel   fixed-order merge of the splits -> mean, s, 1/(s + eps);
                                running_mean/running_scale updated in place (no host sync)
    _bn_apply_kernel            (BatchNorm's) y = (x - mean) * (1/(s + eps)) * w + b

  Uncentered, one reduction pass gives both sum(x) and stat(x). Centered, the stat needs the
  mean first: pass 1 reduces sum(x) and is finalized to the mean, pass 2 reduces stat(x - mean)
  (a two-pass, so s_2 is never E[x^2] - E[x]^2).

forward (eval): ``_bn_apply_kernel`` alone, with 1/(running_scale + eps).

backward (training), with a = s + eps, d = x - mean, xhat = d / a, g = dy::

    _lp_bwd_reduce_{ncs,mc}_kernel   partial sum(g), sum(g*d), sum(f), count per (channel, split)
    _lp_bwd_finalize_kernel          fixed-order sum of the splits -> dweight = sum(g*d)/a,
                                     dbias = sum(g) and the per-channel coefficients of dx
    _lp_bwd_dx_kernel                dx = (g - sum(g)/M) * w/a - k3 * (f - k4)

  where ds/dz_i = f_i / D is the derivative of the scale with respect to z::

    p = 1:    f = sign(z),                   D = M
    p = 2:    f = z,                         D = M * s   (k3 = 0 where s = 0)
    p = inf:  f = sign(z) * [|z| = s],       D = #{i : |z_i| = s}

  and k3 = w * sum(g * xhat) / (a * D) = -(dL/ds) / D  (dL/ds = -w * sum(g * xhat) / a), while
  k4 = sum(f) / M when centered (z depends on x through the mean too: dz_j/dx_i = [i=j] - 1/M)
  and 0 otherwise. Tie rule of l_inf: the gradient of the max is split equally among all values
  attaining max|z| in the channel (as torch.amax's), so it does not depend on memory order or
  on the split into programs.

backward (eval): running_mean and running_scale are constants, so l_p normalization is BatchNorm
with invstd = 1/(running_scale + eps): BatchNorm's backward kernels run as they are.

Reductions are split over many programs per channel and merged in a fixed order, so one input
always gives bit-identical results. Statistics accumulate in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .batch_norm import _apply, _elementwise_grid, _partials, batch_norm_bwd
from .common import (
    acc_dtype,
    as_layout,
    chan_load,
    ncs_unit,
    sum_all,
    tile,
    tl_dtype,
    view_layout,
)

# The kernels' constexpr P: 1, 2, or 0 for inf.
_P_CODES = {1: 1, 2: 2, math.inf: 0}


def _p_code(p) -> int:
    return _P_CODES[p]


# ----------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _lp_stat_update(stat, z, mask, P: tl.constexpr):
    """Per-lane accumulation of the scale statistic: sum|z| (P=1), sum z^2 (P=2), max|z| (P=0).

    The max keeps NaN (as torch.amax); masked lanes are left unchanged."""
    if P == 1:
        stat += tl.where(mask, tl.abs(z), 0.0)
    elif P == 2:
        stat += tl.where(mask, z * z, 0.0)
    else:
        stat = tl.maximum(stat, tl.where(mask, tl.abs(z), 0.0), propagate_nan=tl.PropagateNan.ALL)
    return stat


@triton.jit
def _lp_stat_lanes(stat, axis: tl.constexpr, P: tl.constexpr):
    """Reduce the per-lane statistic along ``axis``: a sum, or a max that keeps NaN (tl.max
    drops NaN; adding the sum of the NaN lanes, 0 when there is none, restores it)."""
    if P == 0:
        out = tl.max(stat, axis) + tl.sum(tl.where(stat != stat, stat, 0.0), axis)
    else:
        out = tl.sum(stat, axis)
    return out


@triton.jit
def _lp_direction(z, s, P: tl.constexpr):
    """f with ds/dz = f / D (see the module docstring); s is only read for P=0 (l_inf)."""
    sign = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0)).to(z.dtype)
    if P == 1:
        f = sign
    elif P == 2:
        f = z
    else:
        f = tl.where(tl.abs(z) == s, sign, 0.0)
    return f


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _lp_stats_ncs_kernel(
    x_ptr,  # (N, C, S) contiguous
    mean_ptr,  # [C] ACC, read if CENTER
    part_ptr,  # [2, C, SPLIT] ACC: sum(x) (if SUM_X), stat(z) (if STAT) of each split
    C,
    S,
    N,
    S_BLOCKS,  # position blocks per batch-row block
    UNITS,  # [BLOCK_N, BLOCK_S] tiles per channel
    CHUNK,  # tiles per split
    SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    P: tl.constexpr,
    SUM_X: tl.constexpr,
    STAT: tl.constexpr,
    CENTER: tl.constexpr,  # z = x - mean, else z = x
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    mu = 0.0
    if CENTER:
        mu = tl.load(mean_ptr + c).to(ACC)
    sum_x = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    stat = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for u in range(p * CHUNK, tl.minimum(p * CHUNK + CHUNK, UNITS)):
        offs, mask = ncs_unit(c, u, N, C, S, S_BLOCKS, BLOCK_N, BLOCK_S, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if SUM_X:
            sum_x += x
        if STAT:
            stat = _lp_stat_update(stat, x - mu, mask, P)
    out = part_ptr + c * SPLIT + p
    if SUM_X:
        tl.store(out, sum_all(sum_x))
    if STAT:
        tl.store(out + C * SPLIT, _lp_stat_lanes(_lp_stat_lanes(stat, 1, P), 0, P))


@triton.jit
def _lp_stats_mc_kernel(
    x_ptr,  # (M, C) contiguous (channels last)
    mean_ptr,  # [C] ACC, read if CENTER
    part_ptr,  # [2, C, SPLIT] ACC
    C,
    S,  # spatial size (unused here; the same signature as the other reductions)
    M,
    CHUNK,
    SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    P: tl.constexpr,
    SUM_X: tl.constexpr,
    STAT: tl.constexpr,
    CENTER: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    pc = tl.program_id(0)
    p = tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if CENTER:
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    else:
        mu = 0.0
    sum_x = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    stat = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for off in range(0, CHUNK, BLOCK_M):
        rows = p * CHUNK + off + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        if SUM_X:
            sum_x += x
        if STAT:
            stat = _lp_stat_update(stat, x - mu, mask, P)
    out = part_ptr + cols * SPLIT + p
    if SUM_X:
        tl.store(out, tl.sum(sum_x, 0), mask=cmask)
    if STAT:
        tl.store(out + C * SPLIT, _lp_stat_lanes(stat, 0, P), mask=cmask)


@triton.jit
def _lp_stats_finalize_kernel(
    part_ptr,  # [2, C, SPLIT] ACC partials
    mean_ptr,  # [C] ACC out (if WRITE_MEAN): batch mean
    scale_ptr,  # [C] ACC out (if WRITE_SCALE): batch s_p (saved)
    inv_ptr,  # [C] ACC out (if WRITE_SCALE): 1 / (s_p + eps)
    rmean_ptr,  # [C] running_mean (any float dtype), updated in place if UPDATE and WRITE_MEAN
    rscale_ptr,  # [C] running_scale, updated in place if UPDATE and WRITE_SCALE
    C,
    SPLIT,
    M,  # values per channel, as a float
    momentum,
    eps,
    BLOCK_C: tl.constexpr,
    P: tl.constexpr,
    ACC: tl.constexpr,
    WRITE_MEAN: tl.constexpr,
    WRITE_SCALE: tl.constexpr,
    UPDATE: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if WRITE_MEAN:
        sum_x = tl.zeros([BLOCK_C], ACC)
        for p in range(0, SPLIT):  # fixed order: deterministic
            sum_x += tl.load(part_ptr + cols * SPLIT + p, mask=cmask, other=0.0)
        mean = sum_x / M
        tl.store(mean_ptr + cols, mean, mask=cmask)
        if UPDATE:
            rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(ACC)
            rm = momentum * mean + (1.0 - momentum) * rm
            tl.store(rmean_ptr + cols, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
    if WRITE_SCALE:
        stat = tl.zeros([BLOCK_C], ACC)
        for p in range(0, SPLIT):  # fixed order: deterministic
            part = tl.load(part_ptr + C * SPLIT + cols * SPLIT + p, mask=cmask, other=0.0)
            if P == 0:
                stat = tl.maximum(stat, part, propagate_nan=tl.PropagateNan.ALL)
            else:
                stat += part
        if P == 1:
            s = stat / M
        elif P == 2:
            s = tl.sqrt(stat / M)
        else:
            s = stat
        tl.store(scale_ptr + cols, s, mask=cmask)
        tl.store(inv_ptr + cols, 1.0 / (s + eps), mask=cmask)
        if UPDATE:
            rs = tl.load(rscale_ptr + cols, mask=cmask, other=0.0).to(ACC)
            rs = momentum * s + (1.0 - momentum) * rs
            tl.store(rscale_ptr + cols, rs.to(rscale_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _lp_bwd_reduce_ncs_kernel(
    dy_ptr,  # (N, C, S) contiguous
    x_ptr,  # (N, C, S) contiguous
    mean_ptr,  # [C] ACC
    scale_ptr,  # [C] ACC: s_p
    part_ptr,  # [4, C, SPLIT] ACC: sum(g), sum(g*d), sum(f) (if CENTERED), count (if P=0)
    C,
    S,
    N,
    S_BLOCKS,  # position blocks per batch-row block
    UNITS,  # [BLOCK_N, BLOCK_S] tiles per channel
    CHUNK,  # tiles per split
    SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    P: tl.constexpr,
    CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1)
    mean = tl.load(mean_ptr + c).to(ACC)
    s = tl.load(scale_ptr + c).to(ACC)
    sum_g = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_gd = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_f = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    cnt = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for u in range(p * CHUNK, tl.minimum(p * CHUNK + CHUNK, UNITS)):
        offs, mask = ncs_unit(c, u, N, C, S, S_BLOCKS, BLOCK_N, BLOCK_S, INT64)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - mean, 0.0)
        sum_g += g
        sum_gd += g * d
        if CENTERED:
            f = tl.where(mask, _lp_direction(d, s, P), 0.0)
            sum_f += f
            if P == 0:
                cnt += tl.where(mask & (tl.abs(d) == s), 1.0, 0.0)
        elif P == 0:
            cnt += tl.where(mask & (tl.abs(x) == s), 1.0, 0.0)
    out = part_ptr + c * SPLIT + p
    tl.store(out, sum_all(sum_g))
    tl.store(out + C * SPLIT, sum_all(sum_gd))
    if CENTERED:
        tl.store(out + 2 * C * SPLIT, sum_all(sum_f))
    if P == 0:
        tl.store(out + 3 * C * SPLIT, sum_all(cnt))


@triton.jit
def _lp_bwd_reduce_mc_kernel(
    dy_ptr,  # (M, C) contiguous
    x_ptr,
    mean_ptr,
    scale_ptr,
    part_ptr,  # [4, C, SPLIT] ACC
    C,
    S,  # unused, as above
    M,
    CHUNK,
    SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    P: tl.constexpr,
    CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    pc = tl.program_id(0)
    p = tl.program_id(1)
    cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_gd = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_f = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for off in range(0, CHUNK, BLOCK_M):
        rows = p * CHUNK + off + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - mean, 0.0)
        sum_g += g
        sum_gd += g * d
        if CENTERED:
            f = tl.where(mask, _lp_direction(d, s, P), 0.0)
            sum_f += f
            if P == 0:
                cnt += tl.where(mask & (tl.abs(d) == s), 1.0, 0.0)
        elif P == 0:
            cnt += tl.where(mask & (tl.abs(x) == s), 1.0, 0.0)
    out = part_ptr + cols * SPLIT + p
    tl.store(out, tl.sum(sum_g, 0), mask=cmask)
    tl.store(out + C * SPLIT, tl.sum(sum_gd, 0), mask=cmask)
    if CENTERED:
        tl.store(out + 2 * C * SPLIT, tl.sum(sum_f, 0), mask=cmask)
    if P == 0:
        tl.store(out + 3 * C * SPLIT, tl.sum(cnt, 0), mask=cmask)


@triton.jit
def _lp_bwd_finalize_kernel(
    part_ptr,  # [4, C, SPLIT] ACC
    scale_ptr,  # [C] ACC: s_p
    w_ptr,  # [C] or dummy
    coef_ptr,  # [4, C] ACC out: sum(g)/M, w/a, k3 = w*sum(g*xhat)/(a*D), k4 = sum(f)/M or 0
    dw_ptr,  # [C] out (weight's dtype): sum(g * xhat)
    db_ptr,  # [C] out (bias's dtype): sum(g)
    C,
    SPLIT,
    M,  # values per channel, as a float
    eps,
    BLOCK_C: tl.constexpr,
    P: tl.constexpr,
    CENTERED: tl.constexpr,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    WRITE_COEF: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gd = tl.zeros([BLOCK_C], ACC)
    sum_f = tl.zeros([BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    for p in range(0, SPLIT):  # fixed order: deterministic
        base = part_ptr + cols * SPLIT + p
        sum_g += tl.load(base, mask=cmask, other=0.0)
        sum_gd += tl.load(base + C * SPLIT, mask=cmask, other=0.0)
        if CENTERED and WRITE_COEF:
            sum_f += tl.load(base + 2 * C * SPLIT, mask=cmask, other=0.0)
        if P == 0 and WRITE_COEF:
            cnt += tl.load(base + 3 * C * SPLIT, mask=cmask, other=0.0)
    s = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(ACC)
    a = s + eps
    sum_gxhat = sum_gd / a
    if WRITE_COEF:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if P == 1:
            den = tl.full([BLOCK_C], 1.0, ACC) * M
        elif P == 2:
            den = M * s
        else:
            den = cnt
        k3 = tl.where(den > 0.0, w * sum_gxhat / (a * tl.where(den > 0.0, den, 1.0)), 0.0)
        if CENTERED:
            k4 = sum_f / M
        else:
            k4 = tl.zeros([BLOCK_C], ACC)
        tl.store(coef_ptr + cols, sum_g / M, mask=cmask)
        tl.store(coef_ptr + C + cols, w / a, mask=cmask)
        tl.store(coef_ptr + 2 * C + cols, k3, mask=cmask)
        tl.store(coef_ptr + 3 * C + cols, k4, mask=cmask)
    if WRITE_DW:
        tl.store(dw_ptr + cols, sum_gxhat.to(dw_ptr.dtype.element_ty), mask=cmask)
    if WRITE_DB:
        tl.store(db_ptr + cols, sum_g.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _lp_bwd_dx_kernel(
    dy_ptr,  # [ROWS, COLS] contiguous, same layout as x
    x_ptr,
    dx_ptr,  # out, x's dtype
    mean_ptr,  # [C] ACC
    scale_ptr,  # [C] ACC: s_p
    coef_ptr,  # [4, C] ACC
    ROWS,
    COLS,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,
    P: tl.constexpr,
    CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    _, _, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    s = chan_load(scale_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k3 = chan_load(coef_ptr + 2 * C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k4 = chan_load(coef_ptr + 3 * C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = x - mean
    if CENTERED:
        f = _lp_direction(d, s, P)
    else:
        f = _lp_direction(x, s, P)
    dx = (g - k1) * k2 - k3 * (f - k4)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _finalize_block(C: int) -> int:
    return min(triton.next_power_of_2(C), 1024)


def lp_norm_fwd(x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                centered):
    """Forward l_p normalization; returns ``(y, save_mean, save_scale)``.

    ``p`` is 1, 2 or ``math.inf``. In training the saved statistics are the batch mean and the
    batch scale s_p (not 1/(s_p + eps)), in fp32 (fp64 for fp64 x), and the running buffers (if
    given) are updated in place on the device: r <- momentum * batch + (1 - momentum) * r.
    In eval mode the running statistics are used and ``(y, None, None)`` is returned.
    Arguments are validated by :mod:`bnkernels.functional`.
    """
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    xc = lay.tensor
    P = _p_code(p)
    if training:
        mean = torch.empty(lay.C, device=x.device, dtype=acc)
        scale = torch.empty(lay.C, device=x.device, dtype=acc)
        inv = torch.empty(lay.C, device=x.device, dtype=acc)
        update = running_mean is not None
        block_c = _finalize_block(lay.C)

        def finalize(part, write_mean, write_scale):
            _lp_stats_finalize_kernel[(triton.cdiv(lay.C, block_c),)](
                part, mean, scale, inv,
                running_mean if update else mean, running_scale if update else scale,
                lay.C, part.shape[2], float(lay.M), float(momentum), float(eps),
                BLOCK_C=block_c, P=P, ACC=tl_dtype(acc),
                WRITE_MEAN=write_mean, WRITE_SCALE=write_scale, UPDATE=update,
            )

        # Pass 1: sum(x) (and, uncentered, the scale statistic of x itself).
        part = _partials(_lp_stats_ncs_kernel, _lp_stats_mc_kernel, lay, 2, acc, (xc, xc),
                            dict(P=P, SUM_X=True, STAT=not centered, CENTER=False))
        finalize(part, True, not centered)
        if centered:  # pass 2: the scale statistic of x - mean
            part = _partials(_lp_stats_ncs_kernel, _lp_stats_mc_kernel, lay, 2, acc,
                                (xc, mean), dict(P=P, SUM_X=False, STAT=True, CENTER=True))
            finalize(part, False, True)
        stat_a, stat_b = mean, inv
        save_mean, save_scale = mean, scale
    else:
        stat_a = running_mean
        stat_b = 1.0 / (running_scale.to(acc) + eps)
        save_mean = save_scale = None
    y = _apply(lay, acc, stat_a, stat_b, weight, bias, eps, False, None, None)  # BatchNorm's
    return y, save_mean, save_scale


def lp_norm_bwd(dy, x, p, mean, scale, weight, bias, training, centered, eps, needs):
    """Backward l_p normalization; returns ``(dx, dweight, dbias)`` (None where ``needs`` says so).

    ``mean``/``scale`` are the saved batch mean and s_p in training, and running_mean and
    running_scale in eval mode (constants: no gradient flows through them).
    """
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    lay = view_layout(x)
    acc = acc_dtype(x.dtype)
    xc = lay.tensor
    dyc = as_layout(dy, lay)
    mean = mean.to(acc).contiguous()
    scale = scale.to(acc).contiguous()
    has_w = weight is not None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    block_c = _finalize_block(lay.C)
    grid_c = (triton.cdiv(lay.C, block_c),)
    if not training:
        # Constant statistics: BatchNorm's eval backward with invstd = 1 / (running_scale + eps).
        return batch_norm_bwd(dy, x, mean, 1.0 / (scale + eps), weight, bias, False, None, needs)

    P = _p_code(p)
    centered = bool(centered)
    if not (need_dx or need_dw or need_db):
        return None, None, None
    part = _partials(_lp_bwd_reduce_ncs_kernel, _lp_bwd_reduce_mc_kernel, lay, 4, acc,
                        (dyc, xc, mean, scale), dict(P=P, CENTERED=centered))
    coef = torch.empty((4, lay.C), device=x.device, dtype=acc) if need_dx else scale
    _lp_bwd_finalize_kernel[grid_c](
        part, scale, weight if has_w else scale, coef,
        dw if need_dw else scale, db if need_db else scale,
        lay.C, part.shape[2], float(lay.M), float(eps),
        BLOCK_C=block_c, P=P, CENTERED=centered, HAS_W=has_w, ACC=tl_dtype(acc),
        WRITE_COEF=need_dx, WRITE_DW=need_dw, WRITE_DB=need_db,
    )
    dx = None
    if need_dx:
        dxc = torch.empty_like(xc)
        grid, meta = _elementwise_grid(lay)
        _lp_bwd_dx_kernel[grid](
            dyc, xc, dxc, mean, scale, coef, lay.rows, lay.cols, lay.C,
            CHAN_ON_ROWS=lay.kind == "ncs", P=P, CENTERED=centered,
            ACC=tl_dtype(acc), INT64=lay.int64, **meta,
        )
        dx = lay.restore(dxc)
    return dx, dw, db
