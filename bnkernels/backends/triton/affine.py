"""Per-channel affine kernels shared by BatchNorm and l_p normalization.

Both families end in the same elementwise work once their statistics are known: the forward
y = act(w * (x - mean) * invstd + b [+ residual]) (``affine_apply_kernel``) and the eval (or
given-coefficients) backward dx = (g - k1 - (x - mean) k2) invstd w, or g invstd w in eval
(``affine_dx_kernel``). l_p normalization is this with invstd = 1/(s + eps) (SCALE_FROM).
Noisy BatchNorm's elementwise work has its own kernels (:mod:`.noise`), built from the same
helpers here, so its output and gradient are the same expressions bit for bit.

An optional tensor is present when its pointer is not None: Triton takes a None argument as a
constexpr, so ``ptr is not None`` is decided at compile time and each plan's kernel variant
sees only what it uses (no HAS_* flag beside the pointer that already says it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import chan_load, div_rn, sqrt_rn, tile, tile_ids

# What a per-channel "scale" argument holds (constexpr SCALE_FROM of the kernels).
INVSTD, FROM_VAR, FROM_LP_SCALE = 0, 1, 2


@triton.jit
def invstd_from(scale, eps, SCALE_FROM: tl.constexpr, ACC: tl.constexpr):
    """The multiplier of x - mean: ``scale`` itself (0), 1/sqrt(var + eps) from a (running)
    variance (1), or 1/(s + eps) from an l_p scale (2); correctly rounded."""
    if SCALE_FROM == 1:
        scale = div_rn(1.0, sqrt_rn(scale + eps, ACC), ACC)
    elif SCALE_FROM == 2:
        scale = div_rn(1.0, scale + eps, ACC)
    return scale


@triton.jit
def count_batch(nbt_ptr, first):
    """One program (``first``) adds 1 to the module's num_batches_tracked (``nbt_ptr``; None:
    no count): the count a call of torch's BatchNorm module makes with a separate op, done
    here for free."""
    if nbt_ptr is not None:
        if first:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def bn_affine(x, mean, lo, invstd, w, b, HAS_LO: tl.constexpr):
    """a = w * (x - mean) * invstd + b, with x - mean as (x - mean_hi) - mean_lo if HAS_LO.
    The backward recomputes a (fused ReLU) through this same function, bit for bit."""
    xc = x - mean
    if HAS_LO:
        xc = xc - lo
    return tl.math.fma(xc * invstd, w, b)


@triton.jit
def res_load(res_ptr, offs, mask, ACC: tl.constexpr):
    """The residual at ``offs`` (x's layout), or 0.0 without one (``res_ptr`` None)."""
    r = 0.0
    if res_ptr is not None:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    return r


@triton.jit
def activate(a, r, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """out = act(a + r), r the residual (:func:`res_load`) if HAS_RES; ReLU'd if RELU (NaN
    propagates, as torch.relu)."""
    if HAS_RES:
        a = a + r
    if RELU:
        a = tl.where(a < 0.0, 0.0, a)
    return a


@triton.jit
def relu_grad(g, x, mean, invstd, w, b, RELU: tl.constexpr):
    """dL/da for a = w * xhat + b, given g = dL/dout, out = act(a): with the fused ReLU the
    output is recomputed exactly as the forward computed it (the forward keeps no mean_lo
    when RELU) and, like torch's threshold_backward, the gradient is dropped where out <= 0
    (so NaN passes)."""
    if RELU:
        g = tl.where(bn_affine(x, mean, 0.0, invstd, w, b, False) <= 0.0, 0.0, g)
    return g


@triton.jit
def out_mask(g, out_ptr, dres_ptr, offs, mask):
    """dy masked where the forward's output (``out_ptr``; None: no mask) is <= 0 (a ReLU fused
    after a residual add: the backward reads the output instead of recomputing
    bn(x) + residual), as torch's threshold_backward (NaN passes); the masked dy is
    d(residual), stored at ``dres_ptr`` unless None."""
    if out_ptr is not None:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0.0, 0.0, g)
        if dres_ptr is not None:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)
    return g


@triton.jit
def affine_params(mean_ptr, lo_ptr, scale_ptr, w_ptr, b_ptr, ch, cm, eps,
                  CHAN_ON_ROWS: tl.constexpr, SCALE_FROM: tl.constexpr, ACC: tl.constexpr):
    """The per-channel (mean, mean_lo, invstd, w, b) of an elementwise tile, broadcast against
    it (lo 0 without ``lo_ptr``; w 1 and b 0 without a weight or bias)."""
    mean = chan_load(mean_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    lo = chan_load(lo_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, lo_ptr is not None)
    invstd = invstd_from(chan_load(scale_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC), eps, SCALE_FROM,
                         ACC)
    w = chan_load(w_ptr, ch, cm, 1.0, CHAN_ON_ROWS, ACC, w_ptr is not None)
    b = chan_load(b_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC, b_ptr is not None)
    return mean, lo, invstd, w, b


@triton.jit
def affine_apply_kernel(
    x_ptr,  # [ROWS, COLS] contiguous
    y_ptr,  # [ROWS, COLS] out, x's dtype
    res_ptr,  # [ROWS, COLS]: the residual added before the activation (None: none)
    mean_ptr,  # [C] mean (mean_hi)
    lo_ptr,  # [C] ACC mean_lo (None: none)
    scale_ptr,  # [C] invstd, or what SCALE_FROM says
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    save_mean_ptr,  # [C] ACC out (None: not saved): the mean used, for the backward
    save_invstd_ptr,  # [C] ACC out: the invstd used (with save_mean_ptr)
    ROWS, COLS, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,  # "ncs" layout: channel = row % C; else channel = column
    SCALE_FROM: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                          ALIGN, COLS_ON_X)
    if save_mean_ptr is not None:  # eval with a backward to come: snapshot the statistics
        pr, pk = tile_ids(INT64, COLS_ON_X)  # (the programs holding each channel's first row)
        if CHAN_ON_ROWS:
            first = cm & (rows < C) & (pk == 0)
        else:
            first = cm & (pr == 0)
        tl.store(save_mean_ptr + ch, tl.load(mean_ptr + ch, mask=first, other=0.0).to(ACC),
                 mask=first)
        tl.store(save_invstd_ptr + ch, invstd_from(
            tl.load(scale_ptr + ch, mask=first, other=1.0).to(ACC), eps, SCALE_FROM, ACC),
            mask=first)
    mean, lo, invstd, w, b = affine_params(mean_ptr, lo_ptr, scale_ptr, w_ptr, b_ptr, ch, cm,
                                           eps, CHAN_ON_ROWS, SCALE_FROM, ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    r = res_load(res_ptr, offs, mask, ACC)
    y = activate(bn_affine(x, mean, lo, invstd, w, b, lo_ptr is not None), r,
                 res_ptr is not None, RELU)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def affine_dx_kernel(
    dy_ptr,  # [ROWS, COLS] contiguous, same layout as x
    x_ptr,
    dx_ptr,  # out, x's dtype
    out_ptr,  # the forward's output, for the ReLU's mask (None: no mask; eval's one pass)
    dres_ptr,  # out: d(residual), the masked dy (None: not wanted)
    mean_ptr,  # [C] mean (training) or running_mean (eval)
    scale_ptr,  # [C] invstd, or what SCALE_FROM says
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    coef_ptr,  # [2, C] ACC: mean(g), mean(g * (x - mean)) * invstd^2 (None: eval)
    ROWS, COLS, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr, SCALE_FROM: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    _, _, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64, ALIGN,
                                    COLS_ON_X)
    mean, _, invstd, w, b = affine_params(mean_ptr, None, scale_ptr, w_ptr, b_ptr, ch, cm, eps,
                                          CHAN_ON_ROWS, SCALE_FROM, ACC)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = relu_grad(out_mask(g, out_ptr, dres_ptr, offs, mask), x, mean, invstd, w, b, RELU)
    if coef_ptr is not None:  # training, given the sums
        k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
        k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
        dx = (g - k1 - (x - mean) * k2) * invstd * w
    else:
        dx = g * invstd * w
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
