"""bnkernels lp_norm (l1 / l2 / l_inf normalization): forward, backward and running statistics.

Each backend's result is compared with an independent oracle written here: the formulas of the
definition evaluated in fp64 with plain torch ops (x.abs().mean(...), .pow(2).mean().sqrt(),
.abs().amax(...)), differentiated by torch autograd, on the same (rounded) inputs, with the
per-dtype tolerance table. l_inf inputs get a clear, unique max|z| per channel, so the oracle's
arg-max is the kernels' even in low precision; ties are tested on their own (the documented
rule: the max's gradient is split equally among the tied values).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    Case,
    assert_close,
    assert_no_worse_than_torch,
    make_inputs,
    to_layout,
    use_backend,
)

import bnkernels as bnk
from bnkernels.backends.triton import common as triton_common
from bnkernels.functional import lp_norm

# "triton": its own strategy per shape (one launch per direction here); "triton-split": the
# split reductions finalized by their last program.
BACKENDS = ["triton", "triton-split", "reference", "cpu"]
INF = math.inf
PS = [1, 2, INF]
P_IDS = {1: "l1", 2: "l2", INF: "linf"}

SHAPES = [
    ((5, 3, 17, 23), False),
    ((5, 3, 17, 23), True),  # channels_last
    ((4, 1, 6, 5), False),  # C = 1
    ((4, 67, 3, 5), False),  # C above 64, not a power of two
    ((4, 67, 3, 5), True),
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
MODES = [(p, centered) for p in (1, 2, math.inf) for centered in (False, True)]


def _mode_id(p, centered):
    return {1: "l1", 2: "l2", math.inf: "linf"}[p] + ("-centered" if centered else "-raw")


# Every shape with every (p, centered) in fp32; each low-precision dtype (and AMP) on every
# shape with the (p, centered) modes in rotation, so each dtype meets each mode.
TRAIN_CASES = [(c, p, k) for c in CASES if c.dtype == torch.float32 for (p, k) in MODES]
TRAIN_CASES += [(c, *MODES[i % len(MODES)])
                for i, c in enumerate(c for c in CASES if c.dtype != torch.float32)]


def _dims(x):
    return [0, *range(2, x.dim())]


def _chan(t, x):
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def lp_inputs(case, device, p, seed=0):
    """make_inputs' tensors, with ``running_scale`` for running_var; for l_inf each channel gets
    one spike (alternating sign) far above every other |x| and |x - mean|, so the arg-max of
    max|z| is unique with a wide margin (checked by the oracle)."""
    inp = make_inputs(Case(case.shape, False, torch.float64), "cpu", seed=seed)
    x = inp["x"]
    if p == INF:
        C = x.shape[1]
        xt = x.transpose(0, 1).reshape(C, -1)  # a copy: [C, M]
        M = xt.shape[1]
        for c in range(C):
            big = 5.0 * float(xt[c].abs().max()) + 1.0
            xt[c, (7919 * c + 3) % M] = big if c % 2 == 0 else -big
        x = xt.reshape(C, x.shape[0], *x.shape[2:]).transpose(0, 1)

    def dev(t, dt, layout=False):
        t = t.to(dt).to(device)
        return to_layout(t, case.channels_last) if layout else t

    return dict(
        x=dev(x, case.dtype, True), weight=dev(inp["weight"], case.pdtype),
        bias=dev(inp["bias"], case.pdtype), running_mean=dev(inp["running_mean"], case.pdtype),
        running_scale=dev(inp["running_var"], case.pdtype), dy=dev(inp["dy"], case.dtype, True),
    )


def oracle(inp, p, *, training, centered, affine=True, track=True, momentum=0.1, eps=1e-5,
           unique_max=True):
    """The definition in fp64 with torch autograd (torch.amax splits a tie's gradient equally).

    For l_inf it checks, unless told otherwise, that each channel's max|z| is unique and clear."""
    x = inp["x"].detach().double().cpu().requires_grad_()
    w = inp["weight"].double().cpu().requires_grad_() if affine else None
    b = inp["bias"].double().cpu().requires_grad_() if affine else None
    rm = inp["running_mean"].double().cpu().clone() if track or not training else None
    rs = inp["running_scale"].double().cpu().clone() if track or not training else None
    dims = _dims(x)
    if training:
        mu = x.mean(dims)
        z = x - _chan(mu, x) if centered else x
        if p == 1:
            s = z.abs().mean(dims)
        elif p == 2:
            s = z.pow(2).mean(dims).sqrt()
        else:
            a = z.detach().abs().transpose(0, 1).reshape(x.shape[1], -1)
            top2 = a.topk(min(2, a.shape[1]), dim=1).values
            if unique_max and top2.shape[1] == 2:
                assert bool((top2[:, 1] < 0.9 * top2[:, 0]).all()), "l_inf max is not unique"
            s = z.abs().amax(dims)
        if rm is not None:
            with torch.no_grad():
                rm.copy_(momentum * mu + (1 - momentum) * rm)
                rs.copy_(momentum * s + (1 - momentum) * rs)
    else:
        mu, s = rm, rs
    y = (x - _chan(mu, x)) / _chan(s + eps, x)
    if w is not None:
        y = y * _chan(w, x)
    if b is not None:
        y = y + _chan(b, x)
    y.backward(inp["dy"].double().cpu())
    return dict(y=y.detach(), dx=x.grad, dweight=w.grad if affine else None,
                dbias=b.grad if affine else None, running_mean=rm if track else None,
                running_scale=rs if track else None)


def run(backend, inp, p, *, training, centered, affine=True, track=True, momentum=0.1, eps=1e-5):
    """One forward and backward of bnkernels.lp_norm on ``backend``; returns outputs, gradients
    and the running buffers after the call."""
    use_backend(backend)
    x = inp["x"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_() if affine else None
    b = inp["bias"].clone().requires_grad_() if affine else None
    rm = inp["running_mean"].clone() if track or not training else None
    rs = inp["running_scale"].clone() if track or not training else None
    y = lp_norm(x, p, rm, rs, w, b, training=training, momentum=momentum, eps=eps,
                centered=centered)
    y.backward(inp["dy"])
    return dict(y=y, dx=x.grad, dweight=w.grad if affine else None,
                dbias=b.grad if affine else None, running_mean=rm if track else None,
                running_scale=rs if track else None)


def check(case, device, backend, p, **kw):
    inp = lp_inputs(case, device, p)
    ours = run(backend, inp, p, **kw)
    exact = oracle(inp, p, **kw)
    for key, value in ours.items():
        if value is None:
            assert exact[key] is None, key
            continue
        dt = case.dtype if key in ("y", "dx") else case.pdtype
        assert value.dtype == dt, key
        assert_close(value, exact[key], dt, name=f"{backend} {case} p={p} {kw} {key}")
    # Output and input gradient keep the input's memory format.
    assert ours["y"].stride() == inp["x"].stride()
    assert ours["dx"].stride() == inp["x"].stride()
    return ours


TRAIN_MATRIX = ([(c, p, k, be) for be in ("triton", "reference", "cpu")
                 for c, p, k in TRAIN_CASES]
                + [(c, p, k, "triton-split") for c, p, k in TRAIN_CASES[1::2]])


@pytest.mark.parametrize("case,p,centered,backend", TRAIN_MATRIX,
                         ids=[f"{c}-{_mode_id(p, k)}-{be}" for c, p, k, be in TRAIN_MATRIX])
def test_training_matches_oracle(case, p, centered, backend, device):
    check(case, device, backend, p, training=True, centered=centered)


# Eval uses the running statistics, as constants: the forward and backward do not depend on
# (p, centered) beyond validation, so the modes rotate over the cases.
EVAL_CASES = [(c, *MODES[i % len(MODES)]) for i, c in enumerate(CASES[::2])]


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
@pytest.mark.parametrize("case,p,centered", EVAL_CASES,
                         ids=[f"{c}-{_mode_id(p, k)}" for c, p, k in EVAL_CASES])
def test_eval_matches_oracle(case, p, centered, backend, device):
    check(case, device, backend, p, training=False, centered=centered)


OPTION_CASES = [Case((5, 3, 17, 23)), Case((3, 7, 5, 4), True), Case((16, 13), False,
                                                                      torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        dict(training=True, affine=False, p=1, centered=True),
        dict(training=False, affine=False, p=2, centered=False),
        dict(training=True, track=False, p=INF, centered=True),  # no running buffers
        dict(training=True, momentum=0.0, p=2, centered=True),
        dict(training=True, momentum=1.0, eps=1e-3, p=1, centered=False),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_match_oracle(case, backend, options, device):
    options = dict(options)
    check(case, device, backend, options.pop("p"), **options)


# Training: every (p, centered), NCHW and channels_last alternating; eval (constant statistics,
# a linear map) once per p.
GRADCHECK_MODES = [(p, k, True, i % 2 == 1) for i, (p, k) in enumerate(MODES)]
GRADCHECK_MODES += [(p, p == 2, False, p == 1) for p in PS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "p,centered,training,channels_last", GRADCHECK_MODES,
    ids=[f"{_mode_id(p, k)}-{'train' if t else 'eval'}{'-cl' if cl else ''}"
         for p, k, t, cl in GRADCHECK_MODES])
def test_gradcheck_fp64(p, centered, training, channels_last, backend, device):
    use_backend(backend)
    inp = lp_inputs(Case((2, 2, 2, 3), channels_last, torch.float64), device, p, seed=3)
    x = inp["x"].requires_grad_()
    w = inp["weight"].requires_grad_()
    b = inp["bias"].requires_grad_()
    rm, rs = inp["running_mean"], inp["running_scale"]

    # Fresh running buffers each call: the function is otherwise pure.
    def f(x, w, b):
        return lp_norm(x, p, rm.clone(), rs.clone(), w, b, training=training, centered=centered)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_detects_a_wrong_backward(device, monkeypatch):
    """gradcheck above is not vacuous: a backward off by a little fails it."""
    from bnkernels.backends.reference import formulas as reference_ops

    good = reference_ops.lp_norm_reference_bwd

    def wrong(*args):
        dx, dw, db = good(*args)
        return dx * 1.001, dw, db

    # The eager route's plan and the registered op's entry point both call this function.
    monkeypatch.setattr(reference_ops, "lp_norm_reference_bwd", wrong)
    bnk.set_backend("reference")
    x = lp_inputs(Case((3, 2, 2, 3), False, torch.float64), device, 2)["x"].requires_grad_()
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda x: lp_norm(x, 2, training=True), (x,), eps=1e-6,
                                 atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- l_inf ties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centered", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_linf_tie_rule_splits_equally(backend, centered, channels_last, device):
    """Channel 0 attains max|z| twice (at +8, mean 0.25): each tied value gets exactly half of
    the max's gradient. Channel 1 has a unique max, which gets all of it.

    ds/dx is read off the op itself: (training dx) - (eval dx with the batch statistics as
    running statistics) + w/a * mean(dy) = dL/ds * ds/dx, with dL/ds = -w * dweight / a."""
    use_backend(backend)
    M = 16  # a power of two: the mean and every x - mean are exact in binary
    ch0 = [8.0, -3.0, 8.0, 1.0, -2.0, 0.0, 5.0, -7.0, 2.0, 3.0, -1.0, 4.0, -4.0, 1.0, -6.0, -5.0]
    ch1 = [1.0, -2.0, 3.5, 0.5, -1.0, 2.0, -3.0, 9.0, 1.5, -0.5, 2.5, -2.5, 0.0, 1.0, -1.5, 3.0]
    assert sum(ch0) / M == 0.25 and len(ch0) == len(ch1) == M
    vals = torch.tensor([ch0, ch1], dtype=torch.float32)  # [C, M]
    x = to_layout(vals.reshape(2, 4, 2, 2).transpose(0, 1).to(device), channels_last)
    g = torch.Generator().manual_seed(1)
    # dy correlated with x, so that dL/ds is well away from 0.
    dy = to_layout((torch.randn(x.shape, generator=g) + x.cpu() / 4).to(device), channels_last)
    w = torch.tensor([1.5, 0.75], device=device)
    b = torch.tensor([0.1, -0.2], device=device)
    eps = 1e-5
    rm, rs = torch.zeros(2, device=device), torch.ones(2, device=device)

    xt = x.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    # momentum=1: the running buffers become exactly the batch mean and l_inf scale.
    lp_norm(xt, "inf", rm, rs, wt, b, training=True, momentum=1.0, eps=eps,
            centered=centered).backward(dy)
    mu_expected = torch.tensor([0.25, sum(ch1) / M])
    s_expected = torch.tensor([7.75, 9.0 - float(mu_expected[1])]) if centered else \
        torch.tensor([8.0, 9.0])
    assert torch.equal(rm.cpu(), mu_expected) and torch.equal(rs.cpu(), s_expected)
    xe = x.clone().requires_grad_()
    lp_norm(xe, "inf", rm, rs, w, b, training=False, eps=eps).backward(dy)

    a = rs + eps
    dl_ds = -w * wt.grad / a
    assert bool((dl_ds.abs() > 0.1).all())
    r = xt.grad - xe.grad + _chan(w / a * dy.mean(_dims(dy)), x)
    ds_dx = (r / _chan(dl_ds, x)).transpose(0, 1).reshape(2, M).cpu().double()
    # Expected ds/dx: f/D, minus mean(f)/D when centered (z = x - mean depends on every x).
    expected = torch.zeros(2, M, dtype=torch.float64)
    expected[0, [0, 2]] = 0.5
    expected[1, 7] = 1.0
    if centered:
        expected -= expected.sum(1, keepdim=True) / M
    torch.testing.assert_close(ds_dx, expected, atol=2e-5, rtol=0)
    # And the oracle (torch.amax's equal split) agrees on everything.
    inp = dict(x=x, weight=w, bias=b, running_mean=torch.zeros(2), running_scale=torch.ones(2),
               dy=dy)
    exact = oracle(inp, INF, training=True, centered=centered, momentum=1.0, eps=eps,
                   unique_max=False)
    assert_close(xt.grad, exact["dx"], torch.float32, "dx")
    assert_close(wt.grad, exact["dweight"], torch.float32, "dweight")


# ----------------------------------------------------------------------------- split reductions


SPLIT_CASES = [Case((4, 3, 7, 9)), Case((5, 6, 7, 9), True), Case((37, 11))]
SPLIT_RUNS = [(c, p, k, (2, 7, 1000)[i % 3]) for i, (c, (p, k)) in
              enumerate((c, m) for c in SPLIT_CASES for m in MODES)]


@pytest.mark.parametrize("case,p,centered,split", SPLIT_RUNS,
                         ids=[f"{c}-{_mode_id(p, k)}-split{n}" for c, p, k, n in SPLIT_RUNS])
def test_split_reduction_matches_oracle(case, p, centered, split, device):
    """Many programs per channel (forced: tiny blocks), merged in a fixed order by the last
    program of each channel to finish."""
    with triton_common.override_config(strategy="split", split=split, block_m=16, block_c=4):
        lay = triton_common.view_layout(make_inputs(case, device)["x"])
        assert triton_common.reduce_config(lay).split > 1
        check(case, device, "triton", p, training=True, centered=centered)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", PS, ids=P_IDS.get)
@pytest.mark.parametrize("case", [Case((5, 3, 17, 23)), Case((5, 6, 7, 9), True)], ids=str)
def test_deterministic(backend, p, case, device):
    """Same input, same bits: forward, backward and running statistics, twice."""
    inp = lp_inputs(case, device, p)
    with triton_common.override_config(split=7, block_m=64, block_c=4):
        use_backend(backend)
        for centered in (False, True):
            a = run(backend, inp, p, training=True, centered=centered)
            b = run(backend, inp, p, training=True, centered=centered)
            for key in a:
                assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 5])
def test_centered_l2_is_stable_for_large_mean_small_spread(backend, split, device):
    """Mean 1e3, std 1e-2 in fp32: the centered l2 scale is a two-pass sqrt(mean (x - mean)^2)
    (E[x^2] - E[x]^2 would lose every digit); errors within 2x those of the same formula in
    plain fp32 torch."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 19, 21, generator=g, dtype=torch.float64) * 1e-2 + 1e3).float()
    x = x.to(device)
    rm, rs = torch.zeros(3, device=device), torch.ones(3, device=device)
    with triton_common.override_config(split=split, block_m=64, block_c=4):
        use_backend(backend)
        y = lp_norm(x, 2, rm, rs, training=True, momentum=1.0, centered=True)

    def plain(t):
        z = t - t.mean((0, 2, 3), keepdim=True)
        s = z.pow(2).mean((0, 2, 3), keepdim=True).sqrt()
        return z / (s + 1e-5), s.flatten()

    exact_y, exact_s = plain(x.double().cpu())
    theirs_y, theirs_s = plain(x)
    assert_no_worse_than_torch(y, theirs_y, exact_y, torch.float32, "y")
    assert_no_worse_than_torch(rs, theirs_s, exact_s, torch.float32, "running_scale")
    rel = ((rs.double().cpu() - exact_s) / exact_s).abs().max()
    assert rel < 1e-2, f"running_scale relative error {rel:.3g}"


def test_int64_indexing_path(device):
    """The 64-bit offset variant (used above 2^31 elements) computes the same result."""
    for case in (Case((3, 5, 7, 9), True), Case((3, 5, 7, 9))):
        inp = lp_inputs(case, device, INF)
        ref = run("triton", inp, INF, training=True, centered=True)
        orig = triton_common.Layout.int64
        try:
            triton_common.Layout.int64 = property(lambda self: True)
            wide = run("triton", inp, INF, training=True, centered=True)
        finally:
            triton_common.Layout.int64 = orig
        for key in ref:
            assert_close(wide[key], ref[key], torch.float32, key)


def test_odd_strides_are_made_contiguous(device):
    """A non-contiguous, non-channels-last input (a slice) is read correctly, not mis-strided."""
    base = make_inputs(Case((5, 6, 9, 8)), device)["x"]
    x = base[:, ::2, :, 1:7]
    assert not x.is_contiguous()
    xd = x.double()
    z = xd - xd.mean((0, 2, 3), keepdim=True)
    exact = z / (z.abs().mean((0, 2, 3), keepdim=True) + 1e-5)
    for backend in BACKENDS:
        use_backend(backend)
        y = lp_norm(x, 1, training=True, centered=True)
        assert_close(y, exact, torch.float32, f"{backend} y")


# ----------------------------------------------------------------------------- NaN, bad input


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centered", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("p", PS, ids=P_IDS.get)
@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_propagates(backend, p, centered, channels_last, device):
    """A NaN makes its channel's output, input gradient, dweight and running statistics NaN
    (the l_inf max keeps NaN, as torch.amax) and leaves every other channel finite."""
    inp = lp_inputs(Case((3, 4, 5, 6), channels_last), device, p)
    inp["x"][1, 2, 3, 4] = float("nan")
    ours = run(backend, inp, p, training=True, centered=centered)
    for key in ("y", "dx", "dweight", "running_mean", "running_scale"):
        t = ours[key]
        t = t.transpose(0, 1).reshape(4, -1) if t.dim() > 1 else t.reshape(4, 1)
        assert bool(torch.isnan(t[2]).all()), key
        assert bool(torch.isfinite(t[[0, 1, 3]]).all()), key
    assert bool(torch.isfinite(ours["dbias"]).all())  # sum(dy) does not involve x


def test_accepted_spellings_of_p(device):
    inp = lp_inputs(Case((4, 3, 5)), device, INF)
    x = inp["x"]
    for canonical, spellings in ((1, (1.0, "1")), (2, (2.0, "2")), (INF, (float("inf"), "inf"))):
        ref = lp_norm(x, canonical, training=True)
        for p in spellings:
            assert torch.equal(lp_norm(x, p, training=True), ref), p


def _lp(x, C=None, **kw):
    C = C if C is not None else x.shape[1]
    args = dict(p=2, running_mean=torch.zeros(C), running_scale=torch.ones(C), training=True)
    args.update(kw)
    return lp_norm(x, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    use_backend(backend)
    for p in (3, 0, -1, 1.5, "l2", "Inf", "", None, True, float("nan"), float("-inf"), [2]):
        with pytest.raises(ValueError, match=r"p must be one of 1, 2, inf .*got p="):
            _lp(torch.randn(3, 4), p=p)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _lp(torch.randn(1, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _lp(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="2 or more dims, got 1D"):
        _lp(torch.randn(8), C=8)
    with pytest.raises(ValueError, match="running_mean should contain 4 elements.*not 5"):
        lp_norm(torch.randn(3, 4), 1, torch.zeros(5), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="running_scale should contain 4 elements.*not 3"):
        lp_norm(torch.randn(3, 4), 1, torch.zeros(4), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="weight should contain 4 elements.*not 3"):
        _lp(torch.randn(3, 4), weight=torch.ones(3))
    with pytest.raises(ValueError, match="bias should contain 4 elements.*not 6"):
        _lp(torch.randn(3, 4), bias=torch.ones(6))
    with pytest.raises(TypeError, match="unsupported input dtype torch.int64"):
        _lp(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        _lp(torch.randn(3, 4), weight=torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="must be given in eval mode"):
        lp_norm(torch.randn(3, 4), INF, training=False)
    with pytest.raises(ValueError, match="both running_mean and running_scale, or neither"):
        lp_norm(torch.randn(3, 4), 1, torch.zeros(4), None, training=True)
    with pytest.raises(ValueError, match="momentum=None"):
        _lp(torch.randn(3, 4), momentum=None)
    with pytest.raises(ValueError, match="eps must be a positive"):
        _lp(torch.randn(3, 4), eps=0.0)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    rm, rs = torch.zeros(3), torch.ones(3)
    y = lp_norm(x, 1, rm, rs, w, b, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rs, torch.ones(3))
