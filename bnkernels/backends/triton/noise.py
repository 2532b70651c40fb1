"""The noise of noisy BatchNorm (the paper's Algorithm 1), generated in-kernel.

Counter-based: Philox4x32-10 keyed by ``seed`` (64 bits), with the counter
(c0, c1, c2, c3) = (index low 32 bits, index high 32 bits, step, stream). Nothing is stored: the
backward regenerates exactly the noise of the forward.

* stream 1, index = channel j:  mu_j = n_mu (2 u0 - 1)            ~ U(-n_mu, n_mu)
                                sigma_j = 1 + (n_sigma - 1) u1     ~ U(1, n_sigma)
* stream 0, index = the element's *logical* NCHW index (so the noise does not depend on the
  memory format):               m = mu_j + r_mu (2 u0 - 1)         ~ U(mu_j - r_mu, mu_j + r_mu)
                                s = sigma_j + r_sigma z            ~ N(sigma_j, r_sigma)
  with z = sqrt(-2 ln u1) cos(2 pi u2) (Box-Muller).

Uniforms are u = (r >> 8 + 1/2) / 2^24 in (0, 1) for a 32-bit word r: exactly representable,
so :func:`bnkernels.backends.reference.noisy_bn_noise_reference` (Philox in plain torch)
reproduces them bit for bit.

Across backends the noise agrees to a stated tolerance, not bit for bit: on a GPU
``tl.log`` and ``tl.cos`` are libdevice's precise versions (about 1 ulp) and only ``tl.sqrt``
is the fast approximation, and a product-plus-sum is one fused multiply-add (one rounding)
where PyTorch rounds twice, so m agrees within 2.5 ulp(max(|mu|, r_mu)) and s within 2e-6
relative (see tests/test_noisy_batch_norm.py). Correctly rounded transcendentals would not buy
bit-identity either: PyTorch's CPU log/cos are not correctly rounded. In the interpreter the
noise is bit-identical to the reference's. Within one backend it is bit-identical wherever it
is generated: every multiply-add of the noise and of the noisy output is an explicit
``tl.math.fma``, so no kernel variant (int or tensor step, forward or backward, fused or split)
leaves a contraction to the compiler's choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import view_layout
from .affine import INVSTD, activate, affine_params, bn_affine, res_load
from .common import bcast, chan_bcast, chan_load, tile, unit_rows

STREAM_ELEMENT = 0
STREAM_CHANNEL = 1


@triton.jit
def _uniform(r):
    """uint32 -> float32 in (0, 1), exactly (r >> 8 + 0.5) * 2^-24."""
    return ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _philox4(seed, idx, step, stream, INT64: tl.constexpr):
    """Four uint32 words for counter (idx lo, idx hi, step, stream), idx a block of indices."""
    if INT64:
        lo = (idx & 0xFFFFFFFF).to(tl.uint32)
        hi = (idx >> 32).to(tl.uint32)
    else:
        lo = idx.to(tl.uint32)
        hi = lo * 0
    c2 = lo * 0 + step.to(tl.uint32)
    c3 = lo * 0 + stream
    return tl.philox(seed, lo, hi, c2, c3)


@triton.jit
def channel_noise(ch, seed, step, n_mu, n_sigma):
    """(mu_j, sigma_j) of channels ``ch`` at ``step``."""
    r0, r1, _, _ = _philox4(seed, ch, step, 1, False)
    mu = n_mu * (2.0 * _uniform(r0) - 1.0)
    sigma = tl.math.fma(n_sigma - 1.0, _uniform(r1), 1.0)
    return mu, sigma


@triton.jit
def element_noise(idx, mu, sigma, seed, step, r_mu, r_sigma, INT64: tl.constexpr):
    """(s, m) of the elements with logical indices ``idx`` (mu/sigma broadcast to idx)."""
    r0, r1, r2, _ = _philox4(seed, idx, step, 0, INT64)
    m = tl.math.fma(r_mu, 2.0 * _uniform(r0) - 1.0, mu)
    z = tl.sqrt(-2.0 * tl.log(_uniform(r1))) * tl.cos(6.283185307179586 * _uniform(r2))
    s = tl.math.fma(r_sigma, z, sigma)
    return s, m


@triton.jit
def load_step(step):
    """The noise step as int64: ``step`` itself (an int argument) or the value of a 1-element
    int tensor (read on device: CUDA-graph safe), told apart by the argument's type at compile
    time."""
    if step.dtype.is_ptr():
        out = tl.load(step).to(tl.int64)
    else:
        out = step.to(tl.int64)
    return out


@triton.jit
def noise_params(noise_ptr):
    """(n_mu, n_sigma, r_mu, r_sigma): the call's NoiseConfig, an fp32 [4] tensor the plan
    builds once (:func:`noise_tensor`)."""
    return (tl.load(noise_ptr), tl.load(noise_ptr + 1), tl.load(noise_ptr + 2),
            tl.load(noise_ptr + 3))


# Device tensors plans launch with (held in their launches' fixed arguments), kept for the
# process: a CUDA graph that captured a launch keeps their addresses after the plan is gone
# (PLANS.clear(), eviction), as GRAPH_WORKSPACES keeps the workspaces made in captures. A few
# bytes per NoiseConfig and device.
_NOISE_TENSORS: dict = {}
_STEP_SCRATCH: dict = {}


def noise_tensor(cfg, device) -> torch.Tensor:
    """A NoiseConfig's four scalars as the fp32 [4] tensor the reductions read (``noise_ptr``):
    the same fp32 values as the float arguments of the elementwise kernels
    (:func:`noise_floats`), so the noise is the same bits. Made once per NoiseConfig and device
    (the NoiseConfig is part of a plan's Signature), and kept for the process. Not made inside
    a CUDA graph capture (a host-to-device copy there would fail or be replayed only): a clear
    error asks for a warm-up call first, as torch.cuda.graphs does."""
    device = torch.device(device)
    t = _NOISE_TENSORS.get((cfg, device))
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "noisy_batch_norm: the first call for an input signature (shape, dtype, "
                "layout, noise) cannot be made while a CUDA graph is being captured; run it "
                "once before capturing (a warm-up iteration, as torch.cuda.graphs asks)")
        t = _NOISE_TENSORS[(cfg, device)] = torch.tensor(
            list(noise_floats(cfg).values()), dtype=torch.float32, device=device)
    return t


def step_scratch(device) -> torch.Tensor:
    """A 1-element int64 tensor a forward with no backward to come writes its step to: written,
    never read, so every plan on the device shares it; kept for the process (see above)."""
    device = torch.device(device)
    t = _STEP_SCRATCH.get(device)
    if t is None:
        t = _STEP_SCRATCH[device] = torch.empty(1, device=device, dtype=torch.int64)
    return t


def noise_floats(cfg) -> dict:
    """A NoiseConfig's four scalars as the float arguments of the elementwise kernels (fp32 in
    the kernel). There, as arguments, they cost no register to hold (a loaded copy took up to
    17 more in the noisy apply kernel); the reductions, short of parameters, load them."""
    return dict(n_mu=float(cfg.n_mu), n_sigma=float(cfg.n_sigma), r_mu=float(cfg.r_mu),
                r_sigma=float(cfg.r_sigma))


@triton.jit(do_not_specialize=["seed", "step"])
def _noise_kernel(
    s_ptr,  # (N, C, S) contiguous out: multiplicative noise
    m_ptr,  # (N, C, S) contiguous out: additive noise
    seed,
    step,  # an int, or a 1-element int tensor read on device
    total, C, S, n_mu, n_sigma, r_mu, r_sigma,
    BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:  # widened before the product (see ..common.program)
        pid = pid.to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    stp = load_step(step)
    ch = (idx // S) % C
    mu, sigma = channel_noise(ch, seed, stp, n_mu, n_sigma)
    s, m = element_noise(idx, mu, sigma, seed, stp, r_mu, r_sigma, INT64)
    tl.store(s_ptr + idx, s, mask=mask)
    tl.store(m_ptr + idx, m, mask=mask)


def step_arg(step):
    """The kernels' ``step`` argument: a 1-element tensor as it is (read on device), an int as
    a plain int."""
    return step if isinstance(step, torch.Tensor) else int(step)


def noisy_batch_norm_noise(x: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, m) noise (fp32, x's shape, contiguous) that noisy BatchNorm applies to ``x``."""
    cfg, seed, step = noise
    lay = view_layout(x)
    s = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    m = torch.empty_like(s)
    total = s.numel()
    block = 1024
    _noise_kernel[(triton.cdiv(total, block),)](
        s_ptr=s, m_ptr=m, seed=int(seed), step=step_arg(step), total=total, C=lay.C, S=lay.S,
        **noise_floats(cfg), BLOCK=block, INT64=lay.int64)
    return s, m


# ----------------------------------------------------------------------------- noisy BatchNorm
# The noise of the BatchNorm kernels. The reductions (:mod:`.batch_norm.kernels`) generate it
# themselves where they take a ``noise_ptr`` (the one-pass forward and backward, the split
# backward's reduction); the elementwise passes of the split forward and backward are the
# kernels here. out = act(s * a + m [+ residual]), a = w * xhat + b; backward,
# dL/da = s * dL/dout (masked by the activation). Every multiply-add is an explicit fma, so
# the noisy output and gradient are the same bits in every kernel and variant (int or tensor
# step, fused or split). The NoiseConfig's four scalars are float arguments of the
# elementwise kernels here, and one fp32 [4] tensor the plan builds once (``noise_ptr``) for
# the reductions; the seed and the step are per-call arguments, never specialized on, so a
# new step recompiles nothing.

_NOISE_NO_SPEC = ["seed", "step"]
_INVSTD = tl.constexpr(INVSTD)  # the statistics are the batch's mean and invstd


@triton.jit
def _logical_index_mc(rows, cols, C, S):
    """NCHW-logical index of element (row = n*S + s, channel col) of a channels-last tensor."""
    n = rows // S
    return (n[:, None] * C + cols[None, :]) * S + (rows - n * S)[:, None]


@triton.jit
def tile_noise(rows, cols, ch, offs, C, S, seed, step, n_mu, n_sigma, r_mu, r_sigma,
               CHAN_ON_ROWS: tl.constexpr, INT64: tl.constexpr):
    """(s, m) of the elements of an elementwise tile (see the module docstring)."""
    mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
    if CHAN_ON_ROWS:
        idx = offs
    else:
        idx = _logical_index_mc(rows, cols, C, S)
    return element_noise(idx, bcast(mu, CHAN_ON_ROWS), bcast(sigma, CHAN_ON_ROWS), seed, step,
                         r_mu, r_sigma, INT64)


@triton.jit
def chan_noise(ch, seed, step, noise_ptr, CL: tl.constexpr):
    """A reduction's per-channel noise: (mu_j, sigma_j) broadcast against its tile, and
    (r_mu, r_sigma) for :func:`unit_noise`."""
    n_mu, n_sigma, r_mu, r_sigma = noise_params(noise_ptr)
    mu, sigma = channel_noise(ch, seed, step, n_mu, n_sigma)
    return chan_bcast(mu, CL), chan_bcast(sigma, CL), r_mu, r_sigma


@triton.jit
def unit_noise(offs, u, ch, mu, sigma, C, S, seed, step, r_mu, r_sigma,
               BLOCK_A: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr):
    """(s, m) of the elements of reduction unit ``u`` (offsets ``offs``; see ..common.unit):
    the logical index is the offset in "ncs", the NCHW index of (row, channel) channels
    last."""
    if CL:
        idx = _logical_index_mc(unit_rows(u, BLOCK_A, INT64), ch, C, S)
    else:
        idx = offs
    return element_noise(idx, mu, sigma, seed, step, r_mu, r_sigma, INT64)


@triton.jit
def noisy_out(a, s, m):
    """s * a + m, one rounding: the noisy BatchNorm's output before the residual and the
    activation (the forward and the backward's recomputation alike)."""
    return tl.math.fma(s, a, m)


@triton.jit
def noisy_grad(g, x, mean, invstd, w, b, s, m, RELU: tl.constexpr):
    """dL/da for a = w * xhat + b, given g = dL/dout, out = act(s * a + m): the output
    recomputed exactly as the forward computed it for the ReLU's mask (dropped where
    out <= 0, so NaN passes, as torch's threshold_backward), then times s."""
    if RELU:
        out = noisy_out(bn_affine(x, mean, 0.0, invstd, w, b, False), s, m)
        g = tl.where(out <= 0.0, 0.0, g)
    return g * s


@triton.jit
def save_step(used_ptr, step, first):
    """The first program records the noise step it used, for the backward, in ``used_ptr`` (a
    1-element int64 tensor; None: not saved)."""
    if used_ptr is not None:
        if first:
            tl.store(used_ptr, step.to(tl.int64))


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def noisy_apply_kernel(
    x_ptr,  # [ROWS, COLS] contiguous
    y_ptr,  # [ROWS, COLS] out, x's dtype
    res_ptr,  # [ROWS, COLS]: the residual added before the activation (None: none)
    mean_ptr,  # [C] ACC batch mean (mean_hi)
    lo_ptr,  # [C] ACC mean_lo (None: none)
    invstd_ptr,  # [C] ACC
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    seed,  # Philox key
    step,  # noise step: an int, or a 1-element int tensor read on device
    used_ptr,  # int64 [1]: gets the noise step used (None: not saved)
    ROWS, COLS, C, S,
    n_mu, n_sigma, r_mu, r_sigma,  # the NoiseConfig (fp32)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHAN_ON_ROWS: tl.constexpr,  # see ..common.tile
    RELU: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    """The split forward's elementwise pass: out = act(s * a + m [+ residual])."""
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                          ALIGN, COLS_ON_X)
    mean, lo, invstd, w, b = affine_params(mean_ptr, lo_ptr, invstd_ptr, w_ptr, b_ptr, ch, cm,
                                           0.0, CHAN_ON_ROWS, _INVSTD, ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    step = load_step(step)
    ns, nm = tile_noise(rows, cols, ch, offs, C, S, seed, step, n_mu, n_sigma, r_mu, r_sigma,
                        CHAN_ON_ROWS, INT64)
    save_step(used_ptr, step, (tl.program_id(0) == 0) & (tl.program_id(1) == 0))
    r = res_load(res_ptr, offs, mask, ACC)
    a = noisy_out(bn_affine(x, mean, lo, invstd, w, b, lo_ptr is not None), ns, nm)
    y = activate(a, r, res_ptr is not None, RELU)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NOISE_NO_SPEC)
def noisy_dx_kernel(
    dy_ptr,  # [ROWS, COLS] contiguous, x's layout (after a residual and a ReLU: the masked dy)
    x_ptr,
    dx_ptr,  # out, x's dtype
    mean_ptr, invstd_ptr,  # [C] ACC: the batch statistics
    w_ptr, b_ptr,  # [C] weight and bias (None: absent)
    coef_ptr,  # [2, C] ACC: mean(g), mean(g * (x - mean)) * invstd^2
    seed,
    step,  # noise step: an int, or a 1-element int tensor read on device
    ROWS, COLS, C, S,
    n_mu, n_sigma, r_mu, r_sigma,  # the NoiseConfig (fp32)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    CHAN_ON_ROWS: tl.constexpr,
    RELU: tl.constexpr,  # recompute the output for the ReLU's mask
    ACC: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr = 1,  # a power of two dividing the rows (S or C)
    COLS_ON_X: tl.constexpr = False,  # grid (column blocks, row blocks): see common.ew_grid
):
    """The split backward's (and SyncBatchNorm's) dx pass: dx = (g - k1 - (x - mean) k2)
    invstd w with g = dL/da regenerated from the noise (:func:`noisy_grad`)."""
    rows, cols, ch, cm, offs, mask = tile(ROWS, COLS, C, BLOCK_R, BLOCK_K, CHAN_ON_ROWS, INT64,
                                          ALIGN, COLS_ON_X)
    mean, _, invstd, w, b = affine_params(mean_ptr, None, invstd_ptr, w_ptr, b_ptr, ch, cm, 0.0,
                                          CHAN_ON_ROWS, _INVSTD, ACC)
    k1 = chan_load(coef_ptr, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    k2 = chan_load(coef_ptr + C, ch, cm, 0.0, CHAN_ON_ROWS, ACC)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    ns, nm = tile_noise(rows, cols, ch, offs, C, S, seed, load_step(step), n_mu, n_sigma, r_mu,
                        r_sigma, CHAN_ON_ROWS, INT64)
    g = noisy_grad(g, x, mean, invstd, w, b, ns, nm, RELU)
    dx = (g - k1 - (x - mean) * k2) * invstd * w
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
