"""BatchNorm in Triton: training/eval forward and backward, with optional fused ReLU and the
paper's noise (noisy BatchNorm runs through the same kernels with NOISY=True).

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
  direction. Forward: one program per channel (or channel group, channels last) reduces its
  values, finalizes the statistics (saved mean/invstd, running statistics updated on the
  device) and writes y, re-reading its values from cache. Backward: the same with the
  gradient sums and dx.
* **split**: two launches per direction. Forward: ``_bn_fwd_kernel`` splits each channel
  over SPLIT programs, each writing a (count, mean, M2) partial to the plan's cached
  workspace; the last program of each channel to finish (an atomic ticket) merges the SPLIT
  partials in a fixed order and finalizes. Then ``_bn_apply_kernel`` writes y. Backward:
  ``_bn_bwd_kernel`` (partial sum(g), sum(g (x - mean)); the last program writes dweight,
  dbias and the coefficients of dx), then ``_bn_bwd_dx_kernel``.

The reduction kernels (``_bn_fwd_kernel``, ``_bn_bwd_kernel``) take both layouts, resolved at
compile time by their constexpr CL (channels last): "ncs", a program per channel, tiles
[BLOCK_N, BLOCK_S] of its (n, s) values; "mc", a program per group of BLOCK_C channels, tiles
[BLOCK_M, BLOCK_C] of the matrix (see the helpers ``group``, ``unit``, ``chan_*`` of
:mod:`..common`).

Eval: the forward is ``_bn_apply_kernel`` alone (invstd = 1/sqrt(running_var + eps) computed in
the kernel); the backward is ``_bn_bwd_dx_kernel`` alone, or, when dweight/dbias are wanted,
the reduction kernel writing dx in the same pass (one launch either way).

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

from ..common import (
    aligned,
    bcast,
    chan_bcast,
    chan_get,
    chan_load,
    chan_put,
    chan_sum,
    div_rn,
    group,
    last_of_group,
    program,
    sqrt_rn,
    tile,
    tile_ids,
    two_sum_err,
    unit,
    unit_end,
    unit_ptrs,
    unit_rows,
)
from ..noise import channel_noise, element_noise, load_step

# Seed and step are never specialized on, so a new step does not recompile anything.
_NOISE_NO_SPEC = ["seed", "step"]
# Rows of partials in a split reduction's workspace ([count, mean, M2, sum] of the forward;
# the backward uses two): the per-channel results start at _WS_VEC * C * SPLIT.
_WS_ROWS = 4
_WS_VEC = tl.constexpr(_WS_ROWS)

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
                 rvar_ptr, momentum, eps, ACC: tl.constexpr, UPDATE: tl.constexpr,
                 OUT_VAR: tl.constexpr):
    """Statistics of channels ``ch`` from their merged (mean of x - shift, M2, count) and plain
    sum of x (``total``): stores the mean and invstd (or the biased var if OUT_VAR), updates the
    running statistics (unbiased variance) if UPDATE; returns (mean_hi, mean_lo, invstd) with
    mean_hi the fp32 mean and mean_lo its rounding error.

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
    if UPDATE:
        rm = tl.load(rmean_ptr + ch, mask=cm, other=0.0).to(ACC)
        rv = tl.load(rvar_ptr + ch, mask=cm, other=0.0).to(ACC)
        unbiased = tl.where(special, float("nan"), div_rn(m2, tl.maximum(cnt - 1.0, 1.0), ACC))
        rm = momentum * hi + (1.0 - momentum) * rm
        rv = momentum * unbiased + (1.0 - momentum) * rv
        tl.store(rmean_ptr + ch, rm.to(rmean_ptr.dtype.element_ty), mask=cm)
        tl.store(rvar_ptr + ch, rv.to(rvar_ptr.dtype.element_ty), mask=cm)
    return hi, lo, invstd


@triton.jit
def _bn_affine(x, mean, lo, invstd, w, b, HAS_LO: tl.constexpr):
    """a = w * (x - mean) * invstd + b, with x - mean as (x - mean_hi) - mean_lo if HAS_LO.
    The backward recomputes a (fused ReLU) through this same function, bit for bit."""
    xc = x - mean
    if HAS_LO:
        xc = xc - lo
    return tl.math.fma(xc * invstd, w, b)


@triton.jit
def _bn_out(a, s, m, RELU: tl.constexpr, NOISY: tl.constexpr, r=0.0,
            HAS_RES: tl.constexpr = False):
    """out = act(s * a + m + r) (noisy) or act(a + r); r: the residual (HAS_RES)."""
    if NOISY:
        a = tl.math.fma(s, a, m)
    if HAS_RES:
        a = a + r
    if RELU:
        a = tl.where(a < 0.0, 0.0, a)  # NaN propagates, as torch.relu
    return a


@triton.jit
def _upstream_grad(g, x, mean, invstd, w, b, s, m, RELU: tl.constexpr, NOISY: tl.constexpr):
    """dL/da for a = w * xhat + b, given g = dL/dout, out = act(s * a + m) or act(a).

    With the fused ReLU the output is recomputed exactly as the forward computed it (the
    forward keeps no mean_lo when RELU) and, like torch's threshold_backward, the gradient is
    dropped where out <= 0 (so NaN passes)."""
    if RELU:
        out = _bn_affine(x, mean, 0.0, invstd, w, b, False)
        if NOISY:
            out = tl.math.fma(s, out, m)
        g = tl.where(out <= 0.0, 0.0, g)
    if NOISY:
        g = g * s
    return g


@triton.jit
def _res_load(res_ptr, offs, mask, ACC: tl.constexpr, HAS_RES: tl.constexpr):
    """The residual at ``offs`` (x's layout), or 0.0 without one."""
    r = 0.0
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    return r


@triton.jit
def _out_mask(g, out_ptr, offs, mask, OUT_MASK: tl.constexpr):
    """dy masked where the forward's output is <= 0 (a ReLU fused after a residual add: the
    backward reads the output instead of recomputing bn(x) + residual), as torch's
    threshold_backward (NaN passes); g itself without OUT_MASK."""
    if OUT_MASK:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0.0, 0.0, g)
    return g


@triton.jit
def _dres_store(dres_ptr, offs, mask, g, OUT_MASK: tl.constexpr):
    """d(residual) = the masked dy (OUT_MASK), in the pass that writes dx."""
    if OUT_MASK:
        if dres_ptr is not None:  # None: d(residual) not wanted
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


# What a per-channel "scale" argument holds (constexpr SCALE_FROM of the kernels).
INVSTD, FROM_VAR, FROM_LP_SCALE = 0, 1, 2


@triton.jit
def _invstd_from(scale, eps, SCALE_FROM: tl.constexpr, ACC: tl.constexpr):
    """The multiplier of x - mean: ``scale`` itself (0), 1/sqrt(var + eps) from a (running)
    variance (1), or 1/(s + eps) from an l_p scale (2); correctly rounded."""
    if SCALE_FROM == 1:
        scale = div_rn(1.0, sqrt_rn(scale + eps, ACC), ACC)
    elif SCALE_FROM == 2:
        scale = div_rn(1.0, scale + eps, ACC)
    return scale


@triton.jit
def _logical_index_mc(rows, cols, C, S):
    """NCHW-logical index of element (row = n*S + s, channel col) of a channels-last tensor."""
    n = rows // S
    return (n[:, None] * C + cols[None, :]) * S + (rows - n * S)[:, None]


@triton.jit
def _unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma,
                BLOCK_A: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr):
    """(s, m) of the elements of reduction unit ``u`` (offsets ``offs``; see .noise): the
    logical index is the offset in "ncs", the NCHW index of (row, channel) channels last."""
    if CL:
        idx = _logical_index_mc(unit_rows(u, BLOCK_A, INT64), ch, C, S)
    else:
        idx = offs
    return element_noise(idx, mu, sigma, seed, step, r_mu, r_sigma, INT64)


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
def _tile_noise(rows, cols, ch, offs, C, S, seed, step, n_mu, n_sigma, r_mu, r_sigma,
                CHAN_ON_ROWS: tl.constexpr, INT64: tl.constexpr):
    """(s, m) of the elements of an elementwise tile (see .noise)."""
    mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
    if CHAN_ON_ROWS:
        idx = offs
    else:
        idx = _logical_index_mc(rows, cols, C, S)
    return element_noise(idx, bcast(mu, CHAN_ON_ROWS), bcast(sigma, CHAN_ON_ROWS), seed, step,
                         r_mu, r_sigma, INT64)


@triton.jit
def _count_batch(nbt_ptr, first, COUNT: tl.constexpr):
    """One program (``first``) adds 1 to the module's num_batches_tracked: the count a call
    of torch's BatchNorm module makes with a separate op, done here for free."""
    if COUNT:
        if first:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _save_step(used_ptr, step, first, SAVE_STEP: tl.constexpr):
    """The first program records the noise step it used, for the backward, in ``used_ptr`` (a
    1-element int64 tensor: the one form every backend saves it in)."""
    if SAVE_STEP:
        if first:
            tl.store(used_ptr, step.to(tl.int64))


# ----------------------------------------------------------------------------- forward kernels


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_fwd_kernel(
    x_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    y_ptr,  # x's shape, out (FUSED)
    res_ptr,  # x's layout: the residual added before the activation (HAS_RES)
    mean_ptr,  # [C] ACC out: mean
    invstd_ptr,  # [C] ACC out: 1/sqrt(biased var + eps), or the biased var if OUT_VAR
    rmean_ptr,  # [C] running_mean, updated in place if UPDATE
    rvar_ptr,  # [C] running_var, updated in place (unbiased variance) if UPDATE
    w_ptr,  # [C] weight (if HAS_W)
    b_ptr,  # [C] bias (if HAS_B)
    ws_ptr,  # ACC workspace (split): [4, C, SPLIT] partials, then [C] mean_lo
    ticket_ptr,  # int32 [groups] (split): programs of each channel group done, reset by the last
    step,  # noise step: a 1-element int tensor (STEP_PTR) or an int
    used_ptr,  # int64 [1]: gets the noise step used (SAVE_STEP)
    nbt_ptr,  # int64 [] num_batches_tracked, incremented once per call (COUNT)
    C,
    S,  # spatial size (channels last: the logical index of the noise)
    UNITS,  # work units of a channel group: [BLOCK_A, BLOCK_B] tiles ("ncs") or rows M (CL)
    CHUNK,  # units per program (CL: a multiple of BLOCK_A)
    SPLIT,  # programs per channel group
    N,
    S_BLOCKS,  # position blocks per batch-row block ("ncs"; 1 channels last)
    momentum,
    eps,
    seed,  # noise: Philox key
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_A: tl.constexpr,  # tile rows: BLOCK_N ("ncs") or BLOCK_M (CL)
    BLOCK_B: tl.constexpr,  # tile columns: BLOCK_S ("ncs") or BLOCK_C, channels a program (CL)
    CL: tl.constexpr,  # channels last: x is (M, C); else (N, C, S), one channel a program
    FUSED: tl.constexpr,  # one program per channel group: finalize and write y here
    UPDATE: tl.constexpr,
    OUT_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_LO: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    SAVE_STEP: tl.constexpr,
    COUNT: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    HAS_RES: tl.constexpr = False,  # add the residual before the activation
    PAIR: tl.constexpr = False,  # two units a loop iteration (bytes in flight; 4-byte x)
):
    if CL:
        C = aligned(C, ALIGN)
    else:
        S = aligned(S, ALIGN)
    pid = program(0, INT64)
    p = program(1, INT64)
    _count_batch(nbt_ptr, (pid == 0) & (p == 0), COUNT)
    ch, cm = group(pid, C, BLOCK_B, CL)
    shift = _shift(x_ptr, ch, cm, S, CL, ACC, INT64)
    mean = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    m2 = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    cnt = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    total = tl.zeros([BLOCK_A, BLOCK_B], ACC)  # plain sum of x: tells special values apart
    # PAIR: two units an iteration, both loads issued before either update (twice the bytes
    # in flight, no more accumulators); each lane still takes its units in order (same bits).
    end = unit_end(p * CHUNK, CHUNK, UNITS, CL)
    for u in range(p * CHUNK, end, (2 if PAIR else 1) * (BLOCK_A if CL else 1)):
        ptrs, mask = unit_ptrs(x_ptr, u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                               INT64)
        x = tl.load(ptrs, mask=mask, other=0.0)
        if PAIR:
            u2 = u + (BLOCK_A if CL else 1)
            ptrs2, mask2 = unit_ptrs(x_ptr, u2, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A,
                                     BLOCK_B, CL, INT64)
            mask2 = mask2 & (u2 < end)
            x2 = tl.load(ptrs2, mask=mask2, other=0.0).to(ACC)
        x = x.to(ACC)
        total += x
        mean, m2, cnt = _welford_update(mean, m2, cnt, x - chan_bcast(shift, CL), mask)
        if PAIR:
            total += x2
            mean, m2, cnt = _welford_update(mean, m2, cnt, x2 - chan_bcast(shift, CL), mask2)
    mean, m2, cnt = _welford_chan(mean, m2, cnt, CL, ACC)
    total = chan_sum(total, CL)
    if FUSED:
        hi, lo, invstd = _bn_finalize(ch, cm, mean, m2, cnt, shift, total, mean_ptr,
                                      invstd_ptr, rmean_ptr, rvar_ptr, momentum, eps, ACC,
                                      UPDATE, OUT_VAR)
        w = chan_bcast(chan_get(w_ptr, ch, cm, 1.0, CL, ACC, HAS_W), CL)
        b = chan_bcast(chan_get(b_ptr, ch, cm, 0.0, CL, ACC, HAS_B), CL)
        mu = 0.0
        sigma = 1.0
        if NOISY:
            step = load_step(step, STEP_PTR)
            mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
            mu, sigma = chan_bcast(mu, CL), chan_bcast(sigma, CL)
            _save_step(used_ptr, step, pid == 0, SAVE_STEP)
        hi, lo, invstd = chan_bcast(hi, CL), chan_bcast(lo, CL), chan_bcast(invstd, CL)
        for u in range(0, UNITS, BLOCK_A if CL else 1):
            offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                              INT64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            ns = 1.0
            nm = 0.0
            if NOISY:
                ns, nm = _unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma,
                                     BLOCK_A, CL, INT64)
            r = _res_load(res_ptr, offs, mask, ACC, HAS_RES)
            y = _bn_out(_bn_affine(x, hi, lo, invstd, w, b, HAS_LO), ns, nm, RELU, NOISY, r,
                        HAS_RES)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + ch * SPLIT + p
        chan_put(part, 0, cm, cnt, CL)
        chan_put(part, C * SPLIT, cm, mean, CL)
        chan_put(part, 2 * C * SPLIT, cm, m2, CL)
        chan_put(part, 3 * C * SPLIT, cm, total, CL)
        if last_of_group(ticket_ptr, pid, SPLIT):
            mean, m2, cnt, total = _merge_partials(ws_ptr + ch * SPLIT, C * SPLIT, SPLIT, cm,
                                                   ACC)
            hi, lo, invstd = _bn_finalize(ch, cm, mean, m2, cnt, shift, total, mean_ptr,
                                          invstd_ptr, rmean_ptr, rvar_ptr, momentum, eps, ACC,
                                          UPDATE, OUT_VAR)
            chan_put(ws_ptr + _WS_VEC * C * SPLIT, ch, cm, lo, CL)
            tl.store(ticket_ptr + pid, 0)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_apply_kernel(
    x_ptr,  # [ROWS, COLS] contiguous
    y_ptr,  # [ROWS, COLS] out, x's dtype
    res_ptr,  # [ROWS, COLS]: the residual added before the activation (HAS_RES)
    mean_ptr,  # [C] mean (mean_hi)
    lo_ptr,  # [C] ACC mean_lo (if HAS_LO)
    scale_ptr,  # [C] invstd, or what SCALE_FROM says
    w_ptr,  # [C] or dummy
    b_ptr,  # [C] or dummy
    step,  # noise step: a 1-element int tensor (STEP_PTR) or an int
    used_ptr,  # int64 [1]: gets the noise step used (SAVE_STEP)
    save_mean_ptr,  # [C] ACC out (SAVE_STATS): the mean used, for the backward
    save_invstd_ptr,  # [C] ACC out (SAVE_STATS): the invstd used
    ROWS,
    COLS,
    C,
    S,
    eps,
    seed,  # noise: Philox key
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,  # "ncs" layout: channel = row % C; else channel = column
    SCALE_FROM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_LO: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    SAVE_STEP: tl.constexpr,
    SAVE_STATS: tl.constexpr,  # eval with a backward to come: snapshot the statistics
    ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    HAS_RES: tl.constexpr = False,  # add the residual before the activation
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                          ALIGN, COLS_ON_X)
    if SAVE_STATS:  # the programs holding each channel's first row (or column block 0)
        pr, pk = tile_ids(INT64, COLS_ON_X)
        if CHAN_ON_ROWS:
            first = cm & (rows < C) & (pk == 0)
        else:
            first = cm & (pr == 0)
        tl.store(save_mean_ptr + ch, tl.load(mean_ptr + ch, mask=first, other=0.0).to(ACC),
                 mask=first)
        tl.store(save_invstd_ptr + ch, _invstd_from(
            tl.load(scale_ptr + ch, mask=first, other=1.0).to(ACC), eps, SCALE_FROM, ACC),
            mask=first)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    lo = chan_load(lo_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, HAS_LO)
    invstd = _invstd_from(chan_load(scale_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC), eps, SCALE_FROM,
                          ACC)
    w = chan_load(w_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC, HAS_W)
    b = chan_load(b_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, HAS_B)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    ns = 1.0
    nm = 0.0
    if NOISY:
        step = load_step(step, STEP_PTR)
        ns, nm = _tile_noise(rows, cols, ch, offs, C, S, seed, step, n_mu, n_sigma, r_mu,
                             r_sigma, CHAN_ON_ROWS, INT64)
        _save_step(used_ptr, step, (tl.program_id(0) == 0) & (tl.program_id(1) == 0),
                   SAVE_STEP)
    r = _res_load(res_ptr, offs, mask, ACC, HAS_RES)
    y = _bn_out(_bn_affine(x, mean, lo, invstd, w, b, HAS_LO), ns, nm, RELU, NOISY, r, HAS_RES)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd, coef_ptr, dw_ptr, db_ptr, C, M,
                     ACC: tl.constexpr, WRITE_COEF: tl.constexpr, WRITE_DW: tl.constexpr,
                     WRITE_DB: tl.constexpr, DW_RAW: tl.constexpr):
    """dweight = sum(g (x - mean)) invstd (sum(g (x - mean)) itself if DW_RAW, for
    SyncBatchNorm), dbias = sum(g), and the coefficients of dx: k1 = mean(g),
    k2 = mean(g (x - mean)) invstd^2 (stored at coef_ptr if WRITE_COEF)."""
    k1 = div_rn(sum_g, M, ACC)
    k2 = div_rn(sum_gx, M, ACC) * invstd * invstd
    if WRITE_COEF:
        tl.store(coef_ptr + ch, k1, mask=cm)
        tl.store(coef_ptr + C + ch, k2, mask=cm)
    if WRITE_DW:
        if DW_RAW:
            tl.store(dw_ptr + ch, sum_gx.to(dw_ptr.dtype.element_ty), mask=cm)
        else:
            tl.store(dw_ptr + ch, (sum_gx * invstd).to(dw_ptr.dtype.element_ty), mask=cm)
    if WRITE_DB:
        tl.store(db_ptr + ch, sum_g.to(db_ptr.dtype.element_ty), mask=cm)
    return k1, k2


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_bwd_kernel(
    dy_ptr,  # (N, C, S) contiguous, or (M, C) channels last (CL)
    x_ptr,  # dy's layout
    dx_ptr,  # out (FUSED, or eval with WRITE_DX)
    out_ptr,  # dy's layout: the forward's output, for the ReLU's mask (OUT_MASK)
    dres_ptr,  # out, dy's layout: d(residual) = the masked dy, written by the first sweep
    # (OUT_MASK; None: not wanted): the split training backward's dx pass reads it as its dy
    mean_ptr,  # [C] mean (training) or running_mean (eval)
    scale_ptr,  # [C] invstd (training) or running_var (eval; see SCALE_FROM)
    w_ptr,
    b_ptr,
    dw_ptr,  # [C] out (weight's dtype) if WRITE_DW
    db_ptr,  # [C] out (bias's dtype) if WRITE_DB
    ws_ptr,  # ACC workspace (split): [2, C, SPLIT] partials, [2, C] coefficients at 4*C*SPLIT
    ticket_ptr,  # int32 [groups] (split)
    step,  # noise step: a 1-element int tensor (STEP_PTR) or an int
    C,
    S,
    UNITS,
    CHUNK,
    SPLIT,
    N,
    S_BLOCKS,
    M_F,  # values per channel, as a float
    eps,
    seed,
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    CL: tl.constexpr,  # channels last (see _bn_fwd_kernel)
    FUSED: tl.constexpr,
    TRAINING: tl.constexpr,
    SCALE_FROM: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
    DW_RAW: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    OUT_MASK: tl.constexpr = False,  # ReLU after a residual add: mask from out, write dres
):
    if CL:
        C = aligned(C, ALIGN)
    else:
        S = aligned(S, ALIGN)
    pid = program(0, INT64)
    p = program(1, INT64)
    ch, cm = group(pid, C, BLOCK_B, CL)
    mu = 0.0
    sigma = 1.0
    if NOISY:
        step = load_step(step, STEP_PTR)
        mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
        mu, sigma = chan_bcast(mu, CL), chan_bcast(sigma, CL)
    mean_c = chan_get(mean_ptr, ch, cm, 0.0, CL, ACC)
    invstd_c = _invstd_from(chan_get(scale_ptr, ch, cm, 1.0, CL, ACC), eps, SCALE_FROM, ACC)
    mean = chan_bcast(mean_c, CL)
    invstd = chan_bcast(invstd_c, CL)
    w = chan_bcast(chan_get(w_ptr, ch, cm, 1.0, CL, ACC, HAS_W), CL)
    b = chan_bcast(chan_get(b_ptr, ch, cm, 0.0, CL, ACC, HAS_B), CL)
    sum_g = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    sum_gx = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for u in range(p * CHUNK, unit_end(p * CHUNK, CHUNK, UNITS, CL), BLOCK_A if CL else 1):
        offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                          INT64)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        ns = 1.0
        nm = 0.0
        if NOISY:
            ns, nm = _unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma,
                                 BLOCK_A, CL, INT64)
        g = _out_mask(g, out_ptr, offs, mask, OUT_MASK)
        _dres_store(dres_ptr, offs, mask, g, OUT_MASK)  # the split dx pass reads it as dy
        g = tl.where(mask, _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY), 0.0)
        sum_g += g
        sum_gx += g * tl.where(mask, x - mean, 0.0)
        if WRITE_DX and not TRAINING:  # eval: dx needs no sums, written in this pass
            tl.store(dx_ptr + offs, (g * invstd * w).to(dx_ptr.dtype.element_ty), mask=mask)
    sum_g = chan_sum(sum_g, CL)
    sum_gx = chan_sum(sum_gx, CL)
    if FUSED:
        k1, k2 = _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd_c, ws_ptr, dw_ptr, db_ptr, C,
                                  M_F, ACC, False, WRITE_DW, WRITE_DB, DW_RAW)
        if WRITE_DX and TRAINING:
            k1 = chan_bcast(k1, CL)
            k2 = chan_bcast(k2, CL)
            for u in range(0, UNITS, BLOCK_A if CL else 1):
                offs, mask = unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL,
                                  INT64)
                g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                ns = 1.0
                nm = 0.0
                if NOISY:
                    ns, nm = _unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu,
                                         r_sigma, BLOCK_A, CL, INT64)
                g = _out_mask(g, out_ptr, offs, mask, OUT_MASK)  # re-read from cache
                g = _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY)
                dx = (g - k1 - (x - mean) * k2) * invstd * w
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + ch * SPLIT + p
        chan_put(part, 0, cm, sum_g, CL)
        chan_put(part, C * SPLIT, cm, sum_gx, CL)
        if last_of_group(ticket_ptr, pid, SPLIT):
            sum_g, sum_gx = _sum_partials(ws_ptr + ch * SPLIT, C * SPLIT, SPLIT, cm)
            _bn_bwd_finalize(ch, cm, sum_g, sum_gx, invstd_c, ws_ptr + _WS_VEC * C * SPLIT,
                             dw_ptr, db_ptr, C, M_F, ACC, WRITE_DX and TRAINING, WRITE_DW,
                             WRITE_DB, DW_RAW)
            tl.store(ticket_ptr + pid, 0)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def _bn_bwd_dx_kernel(
    dy_ptr,  # [ROWS, COLS] contiguous, same layout as x
    x_ptr,
    dx_ptr,  # out, x's dtype
    out_ptr,  # the forward's output, for the ReLU's mask (OUT_MASK: eval's one pass)
    dres_ptr,  # out: d(residual) (OUT_MASK)
    mean_ptr,  # [C] mean (training) or running_mean (eval)
    scale_ptr,  # [C] invstd, or what SCALE_FROM says
    w_ptr,
    b_ptr,
    coef_ptr,  # [2, C] ACC (training): mean(g), mean(g * (x - mean)) * invstd^2
    step,  # noise step: a 1-element int tensor (STEP_PTR) or an int
    ROWS,
    COLS,
    C,
    S,
    eps,
    seed,
    n_mu,
    n_sigma,
    r_mu,
    r_sigma,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,
    TRAINING: tl.constexpr,
    SCALE_FROM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    NOISY: tl.constexpr,
    STEP_PTR: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    OUT_MASK: tl.constexpr = False,  # ReLU after a residual add: mask from out, write dres
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                          ALIGN, COLS_ON_X)
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    invstd = _invstd_from(chan_load(scale_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC), eps, SCALE_FROM,
                          ACC)
    w = chan_load(w_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC, HAS_W)
    b = chan_load(b_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, HAS_B)
    k1 = 0.0
    k2 = 0.0
    if TRAINING:
        k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
        k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    ns = 1.0
    nm = 0.0
    if NOISY:
        step = load_step(step, STEP_PTR)
        ns, nm = _tile_noise(rows, cols, ch, offs, C, S, seed, step, n_mu, n_sigma, r_mu,
                             r_sigma, CHAN_ON_ROWS, INT64)
    g = _out_mask(g, out_ptr, offs, mask, OUT_MASK)
    _dres_store(dres_ptr, offs, mask, g, OUT_MASK)
    g = _upstream_grad(g, x, mean, invstd, w, b, ns, nm, RELU, NOISY)
    if TRAINING:
        dx = (g - k1 - (x - mean) * k2) * invstd * w
    else:
        dx = g * invstd * w
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
