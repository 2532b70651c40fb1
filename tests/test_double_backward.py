"""Second derivatives (double backward) of every op, or a clear error where there are none.

With ``create_graph=True`` the autograd Functions run their backward as differentiable torch ops
(bnkernels.double_backward: the reference formulas with the statistics recomputed from x), so
``torch.autograd.gradgradcheck`` holds in fp64 -- BatchNorm in training and eval, with and
without affine and the fused ReLU, noisy BatchNorm, and l_p for p = 1, 2, inf, centered or not
-- on the eager route (the backends' plans) and the traced route (the registered ops). The
second derivatives also match torch's own BatchNorm double backward, and one that is not zero
is never returned as None. SyncBatchNorm across processes refuses, saying why and what to do.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import use_backend

import bnkernels as bnk
from bnkernels import autograd
from bnkernels.library import OpPlan

BACKENDS = ["reference", "triton", "cpu"]
DT = torch.float64


def _inputs(shape=(3, 2, 2), affine=True, seed=0, spike=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=DT) * 1.5 + 0.3)
    if spike:  # l_inf: a clear max |z| per channel, away from ties
        x[0, :, 0] += torch.tensor([6.0, -6.0], dtype=DT)[: shape[1]]
    x.requires_grad_()
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=DT) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, generator=g, dtype=DT).requires_grad_() if affine else None
    return x, w, b


def _args(*ts):
    return tuple(t for t in ts if t is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_norm_gradgradcheck(backend, training, affine, activation):
    use_backend(backend)
    x, w, b = _inputs(affine=affine)
    rm = torch.linspace(-0.5, 0.5, 2, dtype=DT)
    rv = torch.linspace(0.5, 2.0, 2, dtype=DT)

    def f(x, *wb):
        w, b = wb if wb else (None, None)
        return bnk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3, activation)

    assert torch.autograd.gradgradcheck(f, _args(x, w, b), fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_noisy_batch_norm_gradgradcheck(backend, activation):
    use_backend(backend)
    x, w, b = _inputs()

    def f(x, w, b):
        return bnk.noisy_batch_norm(x, None, None, w, b, True, 0.1, 1e-3, seed=5, step=2,
                                    activation=activation)

    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["l1", "l2", "linf"])
@pytest.mark.parametrize("centered", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_lp_norm_gradgradcheck(backend, p, centered, training):
    use_backend(backend)
    x, w, b = _inputs(spike=p == math.inf)
    rm = torch.linspace(-0.5, 0.5, 2, dtype=DT)
    rs = torch.linspace(0.5, 2.0, 2, dtype=DT)

    def f(x, w, b):
        return bnk.lp_norm(x, p, rm.clone(), rs.clone(), w, b, training, 0.1, 1e-3, centered)

    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_route_gradgradcheck(backend):
    """The traced route (what torch.compile runs: the autograd Function on an OpPlan, which
    calls the registered ops) differentiates twice too."""
    x, w, b = _inputs()
    fast = backend != "reference"
    for training in (True, False):
        rm, rv = torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT)
        bn = OpPlan("batch_norm", training, "relu", None, None, backend)
        lp = OpPlan("lp_norm", training, None, 2, True, backend)

        def f(x, w, b, plan=bn, rm=rm, rv=rv):
            return autograd.NormFunction.apply(x, w, b, (rm.clone(), rv.clone(), plan, 0.1,
                                                         1e-3, None, None))

        def g(x, w, b, plan=lp, rm=rm, rv=rv):
            return autograd.NormFunction.apply(x, w, b, (rm.clone(), rv.clone(), plan, 0.1,
                                                         1e-3, None, None))

        assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=fast)
        assert torch.autograd.gradgradcheck(g, (x, w, b), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_match_torch_and_are_never_none(backend, training):
    """d/dx and d/dweight of sum(dL/dx ** 2) against torch's own BatchNorm double backward,
    with ``allow_unused=True`` (which once returned None for these non-zero gradients)."""
    use_backend(backend)
    x, w, b = _inputs(shape=(4, 2, 3), seed=1)
    rm = torch.linspace(-0.5, 0.5, 2, dtype=DT)
    rv = torch.linspace(0.5, 2.0, 2, dtype=DT)
    results = []
    for fn in (bnk.batch_norm, F.batch_norm):
        y = fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        second = torch.autograd.grad(gx.square().sum() + gw.sum(), (x, w, b),
                                     allow_unused=True)
        results.append(second)
    for ours, theirs, name in zip(*results, ("x", "weight", "bias")):
        if theirs is None:
            assert ours is None or float(ours.abs().max()) == 0.0, name
            continue
        assert ours is not None, f"d/d{name} returned None, torch's is not"
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10, msg=name)


def test_first_derivatives_with_create_graph_equal_the_kernels():
    """The create_graph path returns the same first derivative as the kernels."""
    use_backend("triton")
    x, w, b = _inputs(shape=(4, 2, 3), seed=2)
    y = bnk.batch_norm(x, None, None, w, b, True, activation="relu")
    dy = torch.randn_like(y)
    plain = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    graphed = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    assert graphed[0].requires_grad and graphed[1].requires_grad  # dbias = sum(dy [y > 0])
    for a, g in zip(plain, graphed):
        torch.testing.assert_close(g.detach(), a, rtol=1e-12, atol=1e-12)


def _dims(x):
    return [0, *range(2, x.dim())]


def _ch(t, x):
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _torch_lp(x, p, rm, rs, w, b, training, eps, centered):
    """l_p normalization as plain torch ops (autograd differentiates it)."""
    dims = _dims(x)
    if not training:
        return _ch(w, x) * (x - _ch(rm, x)) / (_ch(rs, x) + eps) + _ch(b, x)
    mean = x.mean(dims)
    z = x - _ch(mean, x) if centered else x
    if p == 1:
        s = z.abs().mean(dims)
    elif p == 2:
        s = z.square().mean(dims).sqrt()
    else:
        s = z.abs().amax(dims)
    return _ch(w, x) * (x - _ch(mean, x)) / (_ch(s, x) + eps) + _ch(b, x)


_CASES = ([("batch_norm", act, None, None) for act in (None, "relu")]
          + [("noisy_batch_norm", act, None, None) for act in (None, "relu")]
          + [("lp_norm", None, p, c) for p in (1, 2, math.inf) for c in (False, True)])


def _case_id(case):
    op, act, p, c = case
    return "-".join(str(v) for v in (op, act or "", p or "", "centered" if c else "") if v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_create_graph_first_derivatives_equal_backward_and_torch(backend, training, case):
    """Every op, with and without the fused ReLU: the first derivatives of a create_graph
    backward equal the normal backward's (the backend's kernels) and torch's (its own op,
    or the op written as torch ops where torch has none), and the second derivatives of a
    function of them equal torch's. A wrong formula in bnkernels.double_backward (a negated
    dx, say) fails here and in the gradgradchecks above."""
    op, act, p, centered = case
    use_backend(backend)
    x, w, b = _inputs(shape=(4, 2, 3), seed=3, spike=p == math.inf)
    rm = torch.linspace(-0.5, 0.5, 2, dtype=DT)
    rv = torch.linspace(0.5, 2.0, 2, dtype=DT)
    eps, cfg = 1e-3, bnk.NoiseConfig()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=DT)

    def ours():
        if op == "lp_norm":
            return bnk.lp_norm(x, p, rm.clone(), rv.clone(), w, b, training, 0.1, eps, centered)
        if op == "noisy_batch_norm":
            return bnk.noisy_batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps,
                                        cfg, seed=7, step=3, activation=act)
        return bnk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps, act)

    def theirs():
        if op == "lp_norm":
            return _torch_lp(x, p, rm, rv, w, b, training, eps, centered)
        if op == "noisy_batch_norm" and training:
            s, m = bnk.noisy_batch_norm_noise(x.detach(), cfg, seed=7, step=3)
            y = s.to(DT) * F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, eps) \
                + m.to(DT)
        elif op == "noisy_batch_norm":  # eval: the noise's expectation
            es, em = cfg.expectation()
            y = es * F.batch_norm(x, rm.clone(), rv.clone(), w, b, False, 0.1, eps) + em
        else:
            y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, eps)
        return F.relu(y) if act == "relu" else y

    plain = torch.autograd.grad(ours(), (x, w, b), dy)
    graphed = torch.autograd.grad(ours(), (x, w, b), dy, create_graph=True)
    ref = torch.autograd.grad(theirs(), (x, w, b), dy, create_graph=True)
    assert graphed[0].requires_grad and graphed[1].requires_grad
    for name, g, a, r in zip(("dx", "dweight", "dbias"), graphed, plain, ref):
        torch.testing.assert_close(g.detach(), a, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(g.detach(), r.detach(), rtol=1e-9, atol=1e-10, msg=name)
    seconds = []
    for gx, gw, _ in (graphed, ref):
        seconds.append(torch.autograd.grad((gx * dy.flip(0)).sum() + (gw * gw).sum(), (x, w),
                                           allow_unused=True))
    for name, o, t in zip(("x", "weight"), *seconds):
        assert (o is None) == (t is None) or float((o if o is not None else t).abs().max()) == 0
        if o is not None and t is not None:
            torch.testing.assert_close(o, t, rtol=1e-8, atol=1e-9, msg=f"d/d{name}")


def test_sync_batch_norm_across_processes_refuses_double_backward():
    """The multi-process path (here in a one-process stand-in for the collectives) raises a
    clear error instead of a wrong or None second derivative."""
    import test_fuzz

    x, w, b = _inputs()
    from bnkernels import sync

    with test_fuzz._one_process_group(True):
        y = sync.sync_batch_norm(x, None, None, w, b, 0.1, 1e-5, None, None, 1)
        (gx,) = torch.autograd.grad(y.sum(), (x,))  # first derivatives work
        assert gx.shape == x.shape
        y = sync.sync_batch_norm(x, None, None, w, b, 0.1, 1e-5, None, None, 1)
        with pytest.raises(RuntimeError, match=r"SyncBatchNorm \(across processes\): double "
                           r"backward .* not supported.*in one process"):
            torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
