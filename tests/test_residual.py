"""BatchNorm + residual add (+ ReLU) in one pass: ``bnk.batch_norm(x, ..., residual=z)``
against torch's composite ``act(F.batch_norm(x, ...) + z)`` in fp64, on both sides of the
tolerance; gradcheck (d(residual) included); running statistics; layouts and dtypes; noisy
BatchNorm; the registered ops under torch.compile; errors naming the residual."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_close, make_inputs, to_layout, use_backend

import bnkernels as bnk

BACKENDS = ["reference", "triton-fused", "triton-split"]


def _composite(inp, z, training, activation, rm, rv):
    """act(F.batch_norm(x) + z) in fp64, torch's own ops (the running buffers updated)."""
    y = F.batch_norm(inp["x"].double(), rm, rv, inp["weight"].double(), inp["bias"].double(),
                     training, 0.1, 1e-5) + z.double()
    return y.relu() if activation == "relu" else y


def _check(case, device, backend, training, activation, res_channels_last=None):
    use_backend(backend)
    inp = make_inputs(case, device, seed=5)
    g = torch.Generator().manual_seed(9)
    z = torch.randn(case.shape, generator=g, dtype=torch.float64).to(case.dtype).to(device)
    z = to_layout(z, case.channels_last if res_channels_last is None else res_channels_last)
    x = inp["x"].requires_grad_()
    w, b = inp["weight"].requires_grad_(), inp["bias"].requires_grad_()
    z.requires_grad_()
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    y = bnk.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=activation, residual=z)
    dx, dw, db, dz = torch.autograd.grad(y, (x, w, b, z), inp["dy"])
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, z)]
    ref_in = dict(inp, x=leaves[0], weight=leaves[1], bias=leaves[2])
    rm64, rv64 = inp["running_mean"].double(), inp["running_var"].double()
    yr = _composite(ref_in, leaves[3], training, activation, rm64, rv64)
    grads = torch.autograd.grad(yr, leaves, inp["dy"].double())
    assert y.dtype == case.dtype and y.stride() == torch.empty_like(inp["x"]).stride()
    assert_close(y, yr, case.dtype, "y")
    for name, ours, ref in zip(("dx", "dweight", "dbias", "dresidual"), (dx, dw, db, dz), grads):
        assert_close(ours, ref, case.dtype, name)
    assert_close(rm, rm64, case.dtype, "running_mean")
    assert_close(rv, rv64, case.dtype, "running_var")
    return y, yr


CASES = [Case((4, 3, 5, 6)), Case((4, 3, 5, 6), True), Case((6, 5)), Case((2, 3, 3, 4, 2), True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matches_torch_composite(backend, case, training, activation, device):
    _check(case, device, backend, training, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype, device):
    _check(Case((4, 3, 5, 6), True, dtype, torch.float32 if dtype != torch.float64 else None),
           device, backend, True, "relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_cl", [False, True])
def test_residual_with_its_own_strides(backend, x_cl, device):
    """A residual strided unlike x (channels last against NCHW and back) is read in x's
    layout; the output keeps x's."""
    _check(Case((4, 3, 5, 6), x_cl), device, backend, True, "relu", res_channels_last=not x_cl)
    _check(Case((4, 3, 5, 6), x_cl), device, backend, False, None, res_channels_last=not x_cl)


def test_tolerance_is_two_sided(device):
    """The comparison above fails for the nearest wrong fusions: the residual dropped, or
    added after the ReLU."""
    use_backend("triton")
    inp = make_inputs(Case((4, 3, 5, 6)), device, seed=5)
    z = torch.randn_like(inp["x"])
    y = bnk.batch_norm(inp["x"], None, None, inp["weight"], inp["bias"], True,
                       activation="relu", residual=z)
    exact = _composite(inp, z, True, "relu", None, None)
    assert_close(y, exact, torch.float32, "y")
    for wrong in (_composite(inp, z * 0, True, "relu", None, None),
                  _composite(inp, z * 0, True, "relu", None, None) + z.double()):
        with pytest.raises(AssertionError, match="outside"):
            assert_close(y, wrong, torch.float32, "y")


@pytest.mark.parametrize("backend", ["reference", "triton-fused", "triton-split"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_fp64(backend, training, activation, device):
    use_backend(backend)
    inp = make_inputs(Case((3, 2, 3, 2), True, torch.float64), device, seed=3)
    x = inp["x"].requires_grad_()
    w, b = inp["weight"].requires_grad_(), inp["bias"].requires_grad_()
    z = torch.randn(3, 2, 3, 2, dtype=torch.float64, device=device).requires_grad_()
    rm, rv = inp["running_mean"], inp["running_var"]

    def f(x, w, b, z):
        return bnk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                              activation=activation, residual=z)

    # The kernels' backward in full on the reference backend, in fast mode (a random
    # projection of the Jacobian) on the interpreted Triton kernels.
    fast = backend != "reference"
    assert torch.autograd.gradcheck(f, (x, w, b, z), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=fast)
    if backend == "reference" or (training and activation == "relu"):
        # Double backward: the composite of double_backward.py, the ReLU's mask from out.
        assert torch.autograd.gradgradcheck(f, (x, w, b, z), eps=1e-6, atol=1e-5, rtol=1e-4,
                                            fast_mode=fast)


def test_only_the_residual_wants_a_gradient(device):
    """d(residual) alone (x, weight and bias frozen): no dx pass, the mask applied once."""
    use_backend("triton")
    x = torch.randn(4, 3, 5, 6, device=device)
    z = torch.randn(4, 3, 5, 6, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    y = bnk.batch_norm(x, None, None, None, None, True, activation="relu", residual=z)
    (dz,) = torch.autograd.grad(y, (z,), dy)
    assert torch.equal(dz, torch.where(y > 0, dy, torch.zeros_like(dy)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_noisy_batch_norm_with_residual(backend, training, device):
    """act(s * a + m + z): the same noise as the op without a residual, then + z, then ReLU."""
    use_backend(backend)
    inp = make_inputs(Case((4, 3, 5, 6), True, torch.float64), device, seed=2)
    x = inp["x"].requires_grad_()
    z = torch.randn_like(x).requires_grad_()
    rm, rv = inp["running_mean"], inp["running_var"]
    kw = dict(training=training, seed=7, step=3)
    y = bnk.noisy_batch_norm(x, rm.clone(), rv.clone(), inp["weight"], inp["bias"],
                             activation="relu", residual=z, **kw)
    yr = (bnk.noisy_batch_norm(x, rm.clone(), rv.clone(), inp["weight"], inp["bias"], **kw)
          + z).relu()
    assert_close(y, yr, torch.float64, "y")
    g1 = torch.autograd.grad(y, (x, z), inp["dy"])
    g2 = torch.autograd.grad(yr, (x, z), inp["dy"])
    for name, a, e in zip(("dx", "dresidual"), g1, g2):
        assert_close(a, e, torch.float64, name)


def test_compile_through_the_registered_ops(device):
    use_backend("triton")
    inp = make_inputs(Case((4, 3, 5, 6)), device)
    x = inp["x"].requires_grad_()
    z = torch.randn_like(x).requires_grad_()
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()

    def f(x, z):
        return bnk.batch_norm(x, rm, rv, inp["weight"], inp["bias"], True, activation="relu",
                              residual=z)

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, z)
    dx, dz = torch.autograd.grad(y, (x, z), inp["dy"])
    rm2, rv2 = inp["running_mean"].clone(), inp["running_var"].clone()
    yr = (F.batch_norm(x, rm2, rv2, inp["weight"], inp["bias"], True) + z).relu()
    dxr, dzr = torch.autograd.grad(yr, (x, z), inp["dy"])
    for name, a, e in (("y", y, yr), ("dx", dx, dxr), ("dz", dz, dzr), ("rm", rm, rm2)):
        assert_close(a, e, torch.float32, name)
    torch.library.opcheck(torch.ops.bnkernels.batch_norm.default, (
        x.detach(), None, None, None, None, None, True, 0.1, 1e-5, "relu", None, 0, 0, None,
        "triton", z.detach()))


def test_cuda_backend_refuses_the_residual_and_auto_moves_on():
    reasons = bnk.backends.backend("cuda").not_supported_reasons(
        "batch_norm+residual", torch.empty(2, 3))
    assert any("residual" in r for r in reasons)
    bnk.set_backend("cuda")
    with pytest.raises(RuntimeError, match="residual"):
        bnk.batch_norm(torch.randn(2, 3), None, None, training=True, residual=torch.randn(2, 3))


@pytest.mark.parametrize(("z", "err", "match"), [
    (torch.randn(4, 3, 5), ValueError, r"residual has shape \(4, 3, 5\)"),
    (torch.randn(4, 3, 5, 1), ValueError, r"residual has shape"),
    (torch.randn(4, 3, 5, 6, dtype=torch.float64), TypeError, r"residual is torch.float64"),
    (torch.randn(4, 3, 5, 6, device="meta"), ValueError, r"residual is on meta"),
    ([1.0], TypeError, r"residual must be a tensor"),
])
def test_bad_residual_is_named(z, err, match):
    x = torch.randn(4, 3, 5, 6)
    with pytest.raises(err, match=match):
        bnk.batch_norm(x, None, None, training=True, residual=z)


def test_empty_batch_with_residual():
    x = torch.randn(0, 3, 4, 4)
    z = torch.randn(0, 3, 4, 4)
    assert bnk.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, residual=z,
                          activation="relu").shape == x.shape
