"""l_p normalization (p in {1, 2, inf}) in Triton: training/eval forward and backward.

Per channel, over its M = N * S values (the layouts are BatchNorm's, see
:mod:`bnkernels.backends.triton.batch_norm` and :func:`~.common.view_layout`)::

    mean = sum(x) / M
    z    = x - mean  (centered)  or  x  (uncentered: the scale is taken "before shifting the mean")
    s_1 = sum|z| / M,   s_2 = sqrt(sum z^2 / M),   s_inf = max|z|
    y    = w * (x - mean) / (s + eps) + b

The strategies are BatchNorm's (see :mod:`.batch_norm`): **fused** (one program per channel
or channel group does everything, one launch per direction) or **split** (each channel over
SPLIT programs, the last to finish -- an atomic ticket -- merging the partials in a fixed order
and finalizing; then an elementwise launch). As BatchNorm's, the reduction kernels take both
layouts through a constexpr CL (channels last).

forward (training)::

    _lp_fused_fwd_kernel        (fused) sum(x) and stat(z) (sum|z|, sum z^2 or max|z|) per
                                channel -> mean, s, 1/(s + eps); running_mean/running_scale
                                updated in place (no host sync); y written by the same program
    _lp_stats_kernel            (split) the same statistics, each channel over SPLIT programs
    affine_apply_kernel         (split; shared with BatchNorm, :mod:`..affine`)
                                y = (x - mean) * (1/(s + eps)) * w + b

  Uncentered, one pass gives both sum(x) and stat(x): 2 launches split, 1 fused. Centered, the
  stat needs the mean first (a two-pass, so s_2 is never E[x^2] - E[x]^2): split, pass 1
  reduces sum(x) to the mean and pass 2 stat(x - mean), 3 launches; fused, one program makes
  both passes and the output, 1 launch.

forward (eval): ``affine_apply_kernel`` alone, with 1/(running_scale + eps) computed in it.

backward (training), with a = s + eps, d = x - mean, xhat = d / a, g = dy::

    _lp_bwd_kernel            sum(g), sum(g*d), sum(f), count per channel -> dweight =
                              sum(g*d)/a, dbias = sum(g) and the per-channel coefficients of
                              dx; fused: dx written by the same program
    _lp_bwd_dx_kernel         (split) dx = (g - sum(g)/M) * w/a - k3 * (f - k4)

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
with invstd = 1/(running_scale + eps): the shared ``affine_dx_kernel`` (dx alone) or
BatchNorm's eval reduction runs as it is (one launch).

Reductions are split over many programs per channel and merged in a fixed order, so one input
always gives bit-identical results. Statistics accumulate in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ..affine import count_batch
from ..common import chan_bcast, chan_get, chan_put, chan_sum, div_rn, group, last_of_group

# isort: split
from ..common import chan_load, put_partials, reduce_ids, sqrt_rn, tile, unit, unit_end, unit_loads

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


@triton.jit
def _lp_combine(a, b, P: tl.constexpr):
    """Merge two partial scale statistics: a sum, or (l_inf) a max that keeps NaN."""
    if P == 0:
        out = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    else:
        out = a + b
    return out


@triton.jit
def _lp_finalize_mean(ch, cm, sum_x, M, mean_ptr, rmean_ptr, momentum, ACC: tl.constexpr):
    """mean = sum(x) / M, stored; running_mean updated in place (unless None)."""
    mean = div_rn(sum_x, M, ACC)
    tl.store(mean_ptr + ch, mean, mask=cm)
    if rmean_ptr is not None:
        rm = tl.load(rmean_ptr + ch, mask=cm, other=0.0).to(ACC)
        rm = momentum * mean + (1.0 - momentum) * rm
        tl.store(rmean_ptr + ch, rm.to(rmean_ptr.dtype.element_ty), mask=cm)
    return mean


@triton.jit
def _lp_finalize_scale(ch, cm, stat, M, scale_ptr, rscale_ptr, momentum, eps,
                       P: tl.constexpr, ACC: tl.constexpr):
    """s = stat / M (p=1), sqrt(stat / M) (p=2) or stat (p=inf), stored; running_scale updated
    (unless None); returns (s, 1 / (s + eps))."""
    if P == 1:
        s = div_rn(stat, M, ACC)
    elif P == 2:
        s = sqrt_rn(div_rn(stat, M, ACC), ACC)
    else:
        s = stat
    tl.store(scale_ptr + ch, s, mask=cm)
    if rscale_ptr is not None:
        rs = tl.load(rscale_ptr + ch, mask=cm, other=0.0).to(ACC)
        rs = momentum * s + (1.0 - momentum) * rs
        tl.store(rscale_ptr + ch, rs.to(rscale_ptr.dtype.element_ty), mask=cm)
    return s, div_rn(1.0, s + eps, ACC)


@triton.jit
def _lp_pass(x_ptr, ch, cm, u_start, u_end, mu, C, S, N, S_BLOCKS, BLOCK_A: tl.constexpr,
             BLOCK_B: tl.constexpr, P: tl.constexpr, STAT: tl.constexpr, CL: tl.constexpr,
             ACC: tl.constexpr, INT64: tl.constexpr, PAIR: tl.constexpr = False):
    """Per channel (sum(x), stat(x - mu)) over units u_start..u_end-1 of channels ``ch`` (stat
    0 if not STAT; ``mu`` broadcast against the tile; channels last, rows from u_end on are
    masked)."""
    sum_x = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    stat = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    # PAIR: two units an iteration, both loads first (see _bn_fwd_kernel): the same sums.
    for u in range(u_start, u_end, (2 if PAIR else 1) * (BLOCK_A if CL else 1)):
        x, mask, x2, mask2 = unit_loads(x_ptr, u, u_end, ch, cm, N, C, S, S_BLOCKS, u_end,
                                        BLOCK_A, BLOCK_B, CL, ACC, INT64, PAIR)
        sum_x += x
        if STAT:
            stat = _lp_stat_update(stat, x - mu, mask, P)
        if PAIR:
            sum_x += x2
            if STAT:
                stat = _lp_stat_update(stat, x2 - mu, mask2, P)
    sum_x = chan_sum(sum_x, CL)
    if CL:
        stat = _lp_stat_lanes(stat, 0, P)
    else:
        stat = _lp_stat_lanes(_lp_stat_lanes(stat, 1, P), 0, P)
    return sum_x, stat


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _lp_fused_fwd_kernel(
    x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    y_ptr,  # x's shape, out
    mean_ptr, scale_ptr,  # [C] ACC out: mean, s_p
    rmean_ptr, rscale_ptr,  # [C] running statistics, updated in place (None: not tracked)
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    nbt_ptr,  # int64 [] num_batches_tracked, incremented once per call (None: no count)
    C, S, UNITS, N, S_BLOCKS,
    M_F,  # values per channel, as a float
    momentum, eps,
    BLOCK_A: tl.constexpr,  # tile rows: BLOCK_N ("ncs") or BLOCK_M (CL)
    BLOCK_B: tl.constexpr,  # tile columns: BLOCK_S ("ncs") or BLOCK_C, channels a program (CL)
    CL: tl.constexpr,  # channels last: x is (M, C); else (N, C, S), one channel a program
    P: tl.constexpr,  # 1, 2, or 0 for inf
    CENTERED: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    PAIR: tl.constexpr = False,  # two units a loop iteration (bytes in flight; 4-byte x)
):
    """One program per channel group: the statistics (centered: two passes) and y."""
    C, S, pid, p = reduce_ids(C, S, ALIGN, CL, INT64)  # (p = 0: a grid of one split)
    count_batch(nbt_ptr, (pid == 0) & (p == 0))
    ch, cm = group(pid, C, BLOCK_B, CL)
    if CENTERED:
        sum_x, _ = _lp_pass(x_ptr, ch, cm, 0, UNITS, 0.0, C, S, N, S_BLOCKS, BLOCK_A, BLOCK_B, P,
                            False, CL, ACC, INT64, PAIR)
        mean = _lp_finalize_mean(ch, cm, sum_x, M_F, mean_ptr, rmean_ptr, momentum, ACC)
        _, stat = _lp_pass(x_ptr, ch, cm, 0, UNITS, chan_bcast(mean, CL), C, S, N, S_BLOCKS,
                           BLOCK_A, BLOCK_B, P, True, CL, ACC, INT64, PAIR)
    else:
        sum_x, stat = _lp_pass(x_ptr, ch, cm, 0, UNITS, 0.0, C, S, N, S_BLOCKS, BLOCK_A, BLOCK_B,
                               P, True, CL, ACC, INT64, PAIR)
        mean = _lp_finalize_mean(ch, cm, sum_x, M_F, mean_ptr, rmean_ptr, momentum, ACC)
    _, inv = _lp_finalize_scale(ch, cm, stat, M_F, scale_ptr, rscale_ptr, momentum, eps, P, ACC)
    w = chan_bcast(chan_get(w_ptr, ch, cm, 1.0, CL, ACC, w_ptr is not None), CL)
    b = chan_bcast(chan_get(b_ptr, ch, cm, 0.0, CL, ACC, b_ptr is not None), CL)
    mean, inv = chan_bcast(mean, CL), chan_bcast(inv, CL)
    for u in range(0, UNITS, BLOCK_A if CL else 1):
        offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = (x - mean) * inv * w + b
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lp_stats_kernel(
    x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    mean_ptr,  # [C] ACC out: mean (read in PHASE 2)
    scale_ptr,  # [C] ACC out: s_p
    rmean_ptr, rscale_ptr,  # [C] running statistics, updated in place (None: not tracked)
    ws_ptr,  # ACC workspace: [2, C, SPLIT] partials at 0, [C] 1/(s+eps) at 4*C*SPLIT
    ticket_ptr,  # int32 [groups]
    nbt_ptr,  # int64 [] num_batches_tracked, incremented once per call (None: no count)
    C, S, UNITS, CHUNK, SPLIT, N, S_BLOCKS,
    M_F,  # values per channel, as a float
    momentum, eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr, P: tl.constexpr,
    PHASE: tl.constexpr,  # 0 sum and stat of x; 1 sum (centered); 2 stat of x - mean
    ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    PAIR: tl.constexpr = False,  # two units a loop iteration (bytes in flight; 4-byte x)
):
    """The split reduction: SPLIT programs per channel group write partials; the last to
    finish (an atomic ticket) merges them in a fixed order and finalizes its phase."""
    C, S, pid, p = reduce_ids(C, S, ALIGN, CL, INT64)
    if PHASE != 2:
        count_batch(nbt_ptr, (pid == 0) & (p == 0))
    ch, cm = group(pid, C, BLOCK_B, CL)
    mu = 0.0
    if PHASE == 2:
        mu = chan_bcast(chan_get(mean_ptr, ch, cm, 0.0, CL, ACC), CL)
    sum_x, stat = _lp_pass(x_ptr, ch, cm, p * CHUNK, tl.minimum(p * CHUNK + CHUNK, UNITS), mu, C,
                           S, N, S_BLOCKS, BLOCK_A, BLOCK_B, P, PHASE != 1, CL, ACC, INT64, PAIR)
    put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL, sum_x, stat)
    if last_of_group(ticket_ptr, pid, SPLIT):
        base = ws_ptr + ch * SPLIT
        sum_x = chan_get(base, 0, cm, 0.0, CL, ACC, CG=True)
        stat = chan_get(base, C * SPLIT, cm, 0.0, CL, ACC, CG=True)
        for q in range(1, SPLIT):  # fixed order: deterministic
            sum_x += chan_get(base, q, cm, 0.0, CL, ACC, CG=True)
            stat = _lp_combine(stat, chan_get(base + C * SPLIT, q, cm, 0.0, CL, ACC, CG=True), P)
        if PHASE != 2:
            _lp_finalize_mean(ch, cm, sum_x, M_F, mean_ptr, rmean_ptr, momentum, ACC)
        if PHASE != 1:
            _, inv = _lp_finalize_scale(ch, cm, stat, M_F, scale_ptr, rscale_ptr, momentum, eps,
                                        P, ACC)
            chan_put(ws_ptr + 4 * C * SPLIT, ch, cm, inv, CL)
        tl.store(ticket_ptr + pid, 0)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _lp_bwd_terms(g, x, mean, s, mask, P: tl.constexpr, CENTERED: tl.constexpr):
    """Per-element (g, g * d, f, [|z| = s]) of the backward sums (0 where masked)."""
    d = tl.where(mask, x - mean, 0.0)
    g = tl.where(mask, g, 0.0)
    if CENTERED:
        z = d
    else:
        z = x
    f = tl.where(mask, _lp_direction(z, s, P), 0.0)
    at_max = tl.where(mask & (tl.abs(z) == s), 1.0, 0.0)
    return g, g * d, f, at_max


@triton.jit
def _lp_bwd_finalize(ch, cm, sum_g, sum_gd, sum_f, cnt, s, w, M, eps, coef_ptr, dw_ptr,
                     db_ptr, C, P: tl.constexpr, CENTERED: tl.constexpr, ACC: tl.constexpr,
                     WRITE_COEF: tl.constexpr):
    """dweight = sum(g d) / a, dbias = sum(g) and the coefficients of dx (module docstring):
    k1 = sum(g) / M, k2 = w / a, k3 = w sum(g xhat) / (a D), k4 = sum(f) / M or 0."""
    a = s + eps
    sum_gxhat = div_rn(sum_gd, a, ACC)
    if P == 1:
        den = tl.zeros_like(s) + M
    elif P == 2:
        den = M * s
    else:
        den = cnt
    k1 = div_rn(sum_g, M, ACC)
    k2 = div_rn(w, a, ACC)
    k3 = tl.where(den > 0.0, div_rn(w * sum_gxhat, a * tl.where(den > 0.0, den, 1.0), ACC), 0.0)
    if CENTERED:
        k4 = div_rn(sum_f, M, ACC)
    else:
        k4 = tl.zeros_like(s)
    if WRITE_COEF:
        tl.store(coef_ptr + ch, k1, mask=cm)
        tl.store(coef_ptr + C + ch, k2, mask=cm)
        tl.store(coef_ptr + 2 * C + ch, k3, mask=cm)
        tl.store(coef_ptr + 3 * C + ch, k4, mask=cm)
    if dw_ptr is not None:
        tl.store(dw_ptr + ch, sum_gxhat.to(dw_ptr.dtype.element_ty), mask=cm)
    if db_ptr is not None:
        tl.store(db_ptr + ch, sum_g.to(db_ptr.dtype.element_ty), mask=cm)
    return k1, k2, k3, k4


@triton.jit
def _lp_dx(g, x, mean, s, k1, k2, k3, k4, P: tl.constexpr, CENTERED: tl.constexpr):
    """dx = (g - k1) * k2 - k3 * (f - k4)."""
    d = x - mean
    if CENTERED:
        f = _lp_direction(d, s, P)
    else:
        f = _lp_direction(x, s, P)
    return (g - k1) * k2 - k3 * (f - k4)


@triton.jit
def _lp_bwd_kernel(
    dy_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    x_ptr,
    dx_ptr,  # out (FUSED)
    mean_ptr,  # [C] ACC
    scale_ptr,  # [C] ACC: s_p
    w_ptr,  # [C] (None: absent)
    dw_ptr, db_ptr,  # [C] out (None: not wanted)
    ws_ptr,  # ACC workspace (split): [4, C, SPLIT] partials at 0, [4, C] coefficients at 4*C*SPLIT
    ticket_ptr,  # int32 [groups] (split)
    C, S, UNITS, CHUNK, SPLIT, N, S_BLOCKS,
    M_F,  # values per channel, as a float
    eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    CL: tl.constexpr,  # channels last: x is (M, C); else (N, C, S), one channel a program
    P: tl.constexpr, FUSED: tl.constexpr, CENTERED: tl.constexpr, WRITE_DX: tl.constexpr,
    ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
):
    C, S, pid, p = reduce_ids(C, S, ALIGN, CL, INT64)
    ch, cm = group(pid, C, BLOCK_B, CL)
    mean_c = chan_get(mean_ptr, ch, cm, 0.0, CL, ACC)
    s_c = chan_get(scale_ptr, ch, cm, 0.0, CL, ACC)
    w_c = chan_get(w_ptr, ch, cm, 1.0, CL, ACC, w_ptr is not None)
    mean = chan_bcast(mean_c, CL)
    s = chan_bcast(s_c, CL)
    sum_g = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    sum_gd = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    sum_f = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    cnt = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for u in range(p * CHUNK, unit_end(p * CHUNK, CHUNK, UNITS, CL), BLOCK_A if CL else 1):
        offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                          INT64)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tg, tgd, tf, tc = _lp_bwd_terms(g, x, mean, s, mask, P, CENTERED)
        sum_g += tg
        sum_gd += tgd
        sum_f += tf
        cnt += tc
    sum_g = chan_sum(sum_g, CL)
    sum_gd = chan_sum(sum_gd, CL)
    sum_f = chan_sum(sum_f, CL)
    cnt = chan_sum(cnt, CL)
    if FUSED:
        k1, k2, k3, k4 = _lp_bwd_finalize(ch, cm, sum_g, sum_gd, sum_f, cnt, s_c, w_c, M_F, eps,
                                          None, dw_ptr, db_ptr, C, P, CENTERED, ACC, False)
        if WRITE_DX:
            k1, k2 = chan_bcast(k1, CL), chan_bcast(k2, CL)
            k3, k4 = chan_bcast(k3, CL), chan_bcast(k4, CL)
            for u in range(0, UNITS, BLOCK_A if CL else 1):
                offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                                  INT64)
                g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                dx = _lp_dx(g, x, mean, s, k1, k2, k3, k4, P, CENTERED)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL, sum_g, sum_gd, sum_f, cnt)
        if last_of_group(ticket_ptr, pid, SPLIT):
            base = ws_ptr + ch * SPLIT
            sum_g = chan_get(base, 0, cm, 0.0, CL, ACC, CG=True)
            sum_gd = chan_get(base, C * SPLIT, cm, 0.0, CL, ACC, CG=True)
            sum_f = chan_get(base, 2 * C * SPLIT, cm, 0.0, CL, ACC, CG=True)
            cnt = chan_get(base, 3 * C * SPLIT, cm, 0.0, CL, ACC, CG=True)
            for q in range(1, SPLIT):  # fixed order: deterministic
                sum_g += chan_get(base, q, cm, 0.0, CL, ACC, CG=True)
                sum_gd += chan_get(base + C * SPLIT, q, cm, 0.0, CL, ACC, CG=True)
                sum_f += chan_get(base + 2 * C * SPLIT, q, cm, 0.0, CL, ACC, CG=True)
                cnt += chan_get(base + 3 * C * SPLIT, q, cm, 0.0, CL, ACC, CG=True)
            _lp_bwd_finalize(ch, cm, sum_g, sum_gd, sum_f, cnt, s_c, w_c, M_F, eps,
                             ws_ptr + 4 * C * SPLIT, dw_ptr, db_ptr, C, P, CENTERED, ACC,
                             WRITE_DX)
            tl.store(ticket_ptr + pid, 0)


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
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHAN_ON_ROWS: tl.constexpr, P: tl.constexpr,
    CENTERED: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    _, _, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                    ALIGN, COLS_ON_X)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    s = chan_load(scale_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k3 = chan_load(coef_ptr + 2 * C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k4 = chan_load(coef_ptr + 3 * C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dx = _lp_dx(g, x, mean, s, k1, k2, k3, k4, P, CENTERED)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
