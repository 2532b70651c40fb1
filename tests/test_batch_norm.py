"""bnkernels.batch_norm against PyTorch: forward, backward and running statistics.

Each backend's result is compared with F.batch_norm evaluated in fp64 (PyTorch itself, on the
inputs upcast to fp64: the exact answer up to fp64 rounding) with the per-dtype tolerance table,
and, in low precision, its error must be at most 2x PyTorch's own error at that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_close, assert_no_worse_than_torch, make_inputs, use_backend

import bnkernels as bnk
from bnkernels.backends.triton import common as triton_common

# "triton" uses its own strategy per shape (one launch per direction on these small shapes);
# "triton-split" forces the split reductions finalized by their last program.
BACKENDS = ["triton", "triton-split", "reference", "cpu"]

# Odd sizes on purpose: non-powers of two everywhere, C=1, C above 64, N=1, 2-D and 3-D inputs.
SHAPES = [
    ((5, 3, 17, 23), False),
    ((5, 3, 17, 23), True),  # channels_last
    ((4, 1, 6, 5), False),  # C = 1
    ((3, 7, 5, 4), True),  # C = 7, channels_last
    ((4, 67, 3, 5), False),  # C above 64, not a power of two
    ((4, 67, 3, 5), True),
    ((1, 5, 9, 11), False),  # N = 1, spatial > 1
    ((16, 13), False),  # (N, C)
    ((6, 5, 11), False),  # (N, C, L)
    ((2, 4, 3, 5, 6), False),  # volume
    ((2, 4, 3, 5, 6), True),  # channels_last_3d
]
DTYPES = [
    (torch.float32, None),
    (torch.float16, None),
    (torch.bfloat16, None),
    (torch.float16, torch.float32),  # AMP: low-precision x, fp32 weight/bias/running stats
    (torch.bfloat16, torch.float32),
]
CASES = [Case(s, cl, dt, pdt) for (s, cl) in SHAPES for (dt, pdt) in DTYPES]


def run(fn, inp, *, training, affine=True, track=True, momentum=0.1, eps=1e-5,
        activation=None, dtype=None, backward=True):
    """One forward (+ backward with the case's dy) of ``fn``; inputs cast to ``dtype`` if given.

    Returns a dict of output, gradients and the running buffers after the call."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.clone())
    x = cast(inp["x"]).requires_grad_(backward)
    w = cast(inp["weight"]).requires_grad_(backward) if affine else None
    b = cast(inp["bias"]).requires_grad_(backward) if affine else None
    rm = cast(inp["running_mean"]) if track else None
    rv = cast(inp["running_var"]) if track else None
    y = fn(x, rm, rv, w, b, training, momentum, eps, activation)
    out = dict(y=y, running_mean=rm, running_var=rv)
    if backward:
        y.backward(cast(inp["dy"]))
        out.update(dx=x.grad, dweight=w.grad if affine else None, dbias=b.grad if affine else None)
    return out


def torch_bn(x, rm, rv, w, b, training, momentum, eps, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return F.relu(y) if activation == "relu" else y


def bnk_bn(backend):
    def fn(x, rm, rv, w, b, training, momentum, eps, activation):
        use_backend(backend)
        return bnk.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation)

    return fn


def check_against_torch(case, device, backend, **kw):
    inp = make_inputs(case, device)
    ours = run(bnk_bn(backend), inp, **kw)
    exact = run(torch_bn, inp, dtype=torch.float64, **kw)
    low_precision = case.dtype in (torch.float16, torch.bfloat16)
    theirs = run(torch_bn, inp, **kw) if low_precision else None
    for key, value in ours.items():
        if value is None:
            assert exact[key] is None, key
            continue
        dt = case.dtype if key in ("y", "dx") else case.pdtype
        assert value.dtype == (case.dtype if key in ("y", "dx") else case.pdtype), key
        assert_close(value, exact[key], dt, name=f"{backend} {case} {key}")
        if low_precision and theirs[key] is not None:
            assert_no_worse_than_torch(value, theirs[key], exact[key], dt, name=f"{case} {key}")
    # Output and input gradient keep the input's memory format, as PyTorch's do.
    assert ours["y"].stride() == inp["x"].stride()
    assert ours["dx"].stride() == inp["x"].stride()


# Every case on the default strategy and the reference; every other case on the forced split.
MATRIX = ([(c, "triton") for c in CASES] + [(c, "triton-split") for c in CASES[1::2]]
          + [(c, "reference") for c in CASES] + [(c, "cpu") for c in CASES])


@pytest.mark.parametrize(("case", "backend"), MATRIX, ids=lambda v: str(v))
def test_training_matches_torch(case, backend, device):
    check_against_torch(case, device, backend, training=True)


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
@pytest.mark.parametrize("case", CASES[::2], ids=str)
def test_eval_matches_torch(case, backend, device):
    check_against_torch(case, device, backend, training=False)


OPTION_CASES = [Case((5, 3, 17, 23)), Case((3, 7, 5, 4), True), Case((16, 13), False,
                                                                      torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        dict(training=True, activation="relu"),
        dict(training=False, activation="relu"),
        dict(training=True, affine=False),
        dict(training=False, affine=False),
        dict(training=True, track=False),  # batch statistics, no running buffers
        dict(training=True, momentum=0.0),
        dict(training=True, momentum=1.0, eps=1e-3),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_match_torch(case, backend, options, device):
    check_against_torch(case, device, backend, **options)


GRADCHECK = [(be, tr, af, act, cl) for be in ("triton", "reference") for tr in (True, False)
             for af in (True, False) for act in (None, "relu") for cl in (False, True)]
GRADCHECK += [("triton-split", tr, True, act, cl) for tr in (True, False) for act in (None, "relu")
              for cl in (False, True)]


@pytest.mark.parametrize(("backend", "training", "affine", "activation", "channels_last"),
                         GRADCHECK)
def test_gradcheck_fp64(backend, training, affine, activation, channels_last, device):
    use_backend(backend)
    inp = make_inputs(Case((3, 2, 3, 2), channels_last, torch.float64), device, seed=3)
    x = inp["x"].requires_grad_()
    w = inp["weight"].requires_grad_() if affine else None
    b = inp["bias"].requires_grad_() if affine else None
    rm, rv = inp["running_mean"], inp["running_var"]
    # Running buffers are updated in every training call; gradcheck sees fresh copies, and the
    # functions are otherwise pure (eval uses them read-only).
    def f(x, w, b):
        return bnk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, activation)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_detects_a_wrong_backward(device, monkeypatch):
    """gradcheck above is not vacuous: a backward off by a little fails it."""
    from bnkernels.backends.reference import formulas as reference_ops

    good = reference_ops.batch_norm_reference_bwd

    def wrong(*args):
        dx, dw, db = good(*args)
        return dx * 1.001, dw, db

    # The eager route's plan and the registered op's entry point both call this function.
    monkeypatch.setattr(reference_ops, "batch_norm_reference_bwd", wrong)
    bnk.set_backend("reference")
    inp = make_inputs(Case((3, 2, 3, 2), False, torch.float64), device)
    x = inp["x"].requires_grad_()
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(
            lambda x: bnk.batch_norm(x, None, None, None, None, True), (x,), eps=1e-6,
            atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean", [1e3, 1e4])
def test_large_mean_small_std_is_stable(backend, mean, device):
    """Mean 1e3 or 1e4 and std 1e-2 in fp32: E[x^2] - E[x]^2 would lose every digit of the
    variance, and even a correctly rounded fp32 mean is off by up to 5e-4 (1e4), 5% of a std.
    The statistics are taken around a per-channel shift and the mean's rounding error is kept
    apart, so the output must be no worse than PyTorch's own (on the CPU: torch's CPU
    BatchNorm, which accumulates in fp64; on a GPU: cuDNN's), and the variance within 1%."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 3, 19, 21, generator=g, dtype=torch.float64) * 1e-2 + mean
    x = x64.float().to(device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = bnk.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact_rm, exact_rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    exact = F.batch_norm(x.double().cpu(), exact_rm, exact_rv, training=True, momentum=1.0)
    trm, trv = torch.zeros(3, device=device), torch.ones(3, device=device)
    theirs = F.batch_norm(x, trm, trv, training=True, momentum=1.0)
    assert_no_worse_than_torch(y, theirs, exact, torch.float32, "y", factor=1.0)
    assert_no_worse_than_torch(rv, trv, exact_rv, torch.float32, "running_var")
    # The variance itself (1e-4) to 1%: E[x^2] - E[x]^2 in fp32 would be off by ~1e-1 here.
    rel = ((rv.double().cpu() - exact_rv) / exact_rv).abs().max()
    assert rel < 1e-2, f"running_var relative error {rel:.3g}"


def test_shifted_statistics_beat_a_rounded_mean(device):
    """The precision above is not free: normalizing around the fp32-rounded mean (what a
    kernel without the shift and the mean's rounding error would do) misses the fp64 output by
    ~5e-2 on a mean-1e4 channel, while ours stays within 1e-3 on every backend."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 2, 9, 7, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    exact = F.batch_norm(x.double(), None, None, training=True)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    rounded = (x.double() - mean.float().double().view(1, -1, 1, 1)) / torch.sqrt(
        var.view(1, -1, 1, 1) + 1e-5)
    assert float((rounded - exact).abs().max()) > 1e-2
    for backend in BACKENDS:
        use_backend(backend)
        y = bnk.batch_norm(x.to(device), None, None, training=True)
        err = float((y.double().cpu() - exact).abs().max())
        assert err < 1e-3, f"{backend}: {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channel(backend, device):
    """Variance 0: output is the bias (xhat = 0), gradients finite, as in PyTorch. On a GPU
    this needs the exact mean of a constant channel (the shift makes every deviation 0)."""
    use_backend(backend)
    inp = make_inputs(Case((4, 3, 5, 6)), device)
    inp["x"][:, 1] = 7.25
    ours = run(bnk_bn(backend), inp, training=True)
    exact = run(torch_bn, inp, training=True, dtype=torch.float64)
    for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
        assert_close(ours[key], exact[key], torch.float32, f"{key}", scale=1.0 if key != "dx"
                     else None)
    assert torch.equal(ours["y"][:, 1], torch.full_like(ours["y"][:, 1], float(inp["bias"][1])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_and_inf_propagate_like_torch(backend, bad, channels_last, device):
    use_backend(backend)
    inp = make_inputs(Case((3, 4, 5, 6), channels_last), device)
    inp["x"][1, 2, 3, 4] = bad
    ours = run(bnk_bn(backend), inp, training=True)
    theirs = run(torch_bn, inp, training=True)
    for key in ("y", "dx", "dweight", "dbias", "running_var"):
        assert torch.equal(torch.isnan(ours[key]), torch.isnan(theirs[key])), key
        assert torch.equal(torch.isinf(ours[key]), torch.isinf(theirs[key])), key
    # The mean of a channel holding inf is inf for a sum (PyTorch on CPU) and NaN for a Welford
    # merge (inf - inf; PyTorch's CUDA kernels): either way non-finite, and only that channel.
    rm_bad, their_bad = ~torch.isfinite(ours["running_mean"]), ~torch.isfinite(
        theirs["running_mean"])
    assert torch.equal(rm_bad, their_bad)
    assert bool(torch.isnan(ours["y"][:, 2]).all())
    assert not bool(torch.isnan(ours["y"][:, [0, 1, 3]]).any())


# ----------------------------------------------------------------------------- split reductions


@pytest.mark.parametrize("case", [Case((5, 3, 17, 23)), Case((5, 6, 7, 9), True),
                                  Case((37, 11))], ids=str)
@pytest.mark.parametrize("split", [2, 7, 1000])
def test_split_reduction_matches_torch(case, split, device):
    """Many programs per channel (forced: tiny blocks), merged by Chan's formula by the last
    program of each channel to finish."""
    with triton_common.override_config(strategy="split", split=split, block_m=16, block_c=4):
        lay = triton_common.view_layout(make_inputs(case, device)["x"])
        assert triton_common.reduce_config(lay).split > 1
        check_against_torch(case, device, "triton", training=True)
        check_against_torch(case, device, "triton", training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [Case((5, 3, 17, 23)), Case((5, 6, 7, 9), True)], ids=str)
def test_deterministic(backend, case, device):
    """Same input, same bits: forward, backward and running statistics, twice."""
    inp = make_inputs(case, device)
    with triton_common.override_config(split=7, block_m=32, block_c=4):
        a = run(bnk_bn(backend), inp, training=True, activation="relu")
        b = run(bnk_bn(backend), inp, training=True, activation="relu")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_int64_indexing_path(device):
    """The 64-bit offset variant (used above 2^31 elements) computes the same result."""
    case = Case((3, 5, 7, 9), True)
    inp = make_inputs(case, device)
    ref = run(bnk_bn("triton"), inp, training=True)
    orig = triton_common.Layout.int64
    try:
        triton_common.Layout.int64 = property(lambda self: True)
        bnk.backends.clear_plans()
        wide = run(bnk_bn("triton"), inp, training=True)
        split = run(bnk_bn("triton-split"), inp, training=True)
    finally:
        triton_common.Layout.int64 = orig
        bnk.backends.clear_plans()
    for key in ref:
        assert_close(split[key], ref[key], torch.float32, key)
    for key in ref:
        assert_close(wide[key], ref[key], torch.float32, key)


def test_permuted_dense_input_keeps_its_strides(device):
    """A dense but permuted input ((N, C, L) stored as (L, N, C)) is read correctly and the
    output has the strides torch.empty_like gives it, as the registered op's fake promises."""
    base = make_inputs(Case((7, 4, 6)), device)["x"]
    x = base.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not x.is_contiguous() and x.shape == (7, 4, 6)
    for backend in BACKENDS:
        use_backend(backend)
        y = bnk.batch_norm(x, None, None, training=True)
        assert y.stride() == torch.empty_like(x).stride()
        assert_close(y, F.batch_norm(x.double(), None, None, training=True), torch.float32, "y")
    torch.library.opcheck(torch.ops.bnkernels.batch_norm.default,
                          (x, None, None, None, None, None, True, 0.1, 1e-5, None, None, 0, 0,
                           None, "triton"))


def test_odd_strides_are_made_contiguous(device):
    """A non-contiguous, non-channels-last input (a slice) is read correctly, not mis-strided."""
    base = make_inputs(Case((5, 6, 9, 8)), device)["x"]
    x = base[:, ::2, :, 1:7]
    assert not x.is_contiguous()
    for backend in BACKENDS:
        use_backend(backend)
        y = bnk.batch_norm(x, None, None, training=True)
        exact = F.batch_norm(x.double(), None, None, training=True)
        assert_close(y, exact, torch.float32, f"{backend} y")


# ----------------------------------------------------------------------------- bad input


def _bn(x, C=None, **kw):
    C = C if C is not None else x.shape[1]
    args = dict(running_mean=torch.zeros(C), running_var=torch.ones(C), training=True)
    args.update(kw)
    return bnk.batch_norm(x, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    use_backend(backend)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _bn(torch.randn(1, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _bn(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="2 or more dims, got 1D"):
        _bn(torch.randn(8), C=8)
    with pytest.raises(ValueError, match="running_mean should contain 4 elements.*not 5"):
        bnk.batch_norm(torch.randn(3, 4), torch.zeros(5), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="weight should contain 4 elements.*not 3"):
        _bn(torch.randn(3, 4), weight=torch.ones(3))
    with pytest.raises(ValueError, match="bias should contain 4 elements.*not 6"):
        _bn(torch.randn(3, 4), bias=torch.ones(6))
    with pytest.raises(TypeError, match="unsupported input dtype torch.int64"):
        _bn(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        _bn(torch.randn(3, 4), weight=torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="must be given in eval mode"):
        bnk.batch_norm(torch.randn(3, 4), None, None, training=False)
    with pytest.raises(ValueError, match="activation must be one of"):
        _bn(torch.randn(3, 4), activation="gelu")
    with pytest.raises(ValueError, match="momentum=None"):
        _bn(torch.randn(3, 4), momentum=None)
    with pytest.raises(ValueError, match="eps must be a positive"):
        _bn(torch.randn(3, 4), eps=0.0)


def test_empty_batch_like_torch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bnk.batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_pick_block_minimises_masked_lanes():
    """Launch heuristic: S = 56*56 = 3136 tiles exactly by 64; 49 cannot be tiled without waste
    by a power of two, and the largest block among the least wasteful is kept."""
    assert triton_common.pick_block(3136, 2048) == 64
    assert triton_common.pick_block(49, 2048) == 64
    assert triton_common.pick_block(4096, 1024) == 1024
    assert triton_common.pick_block(3, 1024, floor=1) == 1


def test_statistics_divisions_are_correctly_rounded(device):
    """The kernels' div_rn/sqrt_rn are correctly rounded, bit for bit (the reference: fp64
    results rounded to fp32, which is exact for a quotient or square root of fp32 values). On a
    GPU this is what Triton's plain fp32 ``/`` and ``tl.sqrt`` fail (they are approximate
    there: 7.25 * 7 / 7 gave 7.2500005); in the interpreter it checks the helpers' wiring.
    (PyTorch's own CPU fp32 sqrt is not correctly rounded on every build: not the reference.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, q_ptr, r_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        a = tl.load(a_ptr + i, mask=m, other=1.0)
        b = tl.load(b_ptr + i, mask=m, other=1.0)
        tl.store(q_ptr + i, triton_common.div_rn(a, b, tl.float32), mask=m)
        tl.store(r_ptr + i, triton_common.sqrt_rn(a, tl.float32), mask=m)

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(4096, generator=g) * 100).to(device)
    b = (torch.rand(4096, generator=g) * 9 + 1).to(device)
    a[:44] = 7.25 * torch.arange(1, 45, dtype=torch.float32)  # sums of equal values ...
    b[:44] = torch.arange(1, 45, dtype=torch.float32)  # ... divided by their count
    q, r = torch.empty_like(a), torch.empty_like(a)
    kernel[(4,)](a, b, q, r, a.numel(), BLOCK=1024)
    assert torch.equal(q, (a.double() / b.double()).float())
    assert torch.equal(q[:44], torch.full_like(q[:44], 7.25))
    assert torch.equal(r, torch.sqrt(a.double()).float())
