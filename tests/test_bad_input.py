"""Bad input gets a clear error, where torch gives one too, and nothing is lost.

For each class of bad input, every op (batch_norm, noisy_batch_norm, lp_norm) and module
(BatchNorm2d, NoisyBatchNorm2d, LpNorm2d, SyncBatchNorm): the error is of torch's kind, its
message names the argument and says what to do, and every buffer (running statistics, the batch
counter, the noise step) is unchanged after the failed call. Where torch's own BatchNorm takes
the same input, the test says so and why ours refuses it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import use_backend
from torch import nn

import bnkernels as bnk

OPS = ["batch_norm", "noisy_batch_norm", "lp_norm"]
MODULES = [bnk.BatchNorm2d, bnk.NoisyBatchNorm2d, bnk.LpNorm2d, bnk.SyncBatchNorm]
C = 3


def _call(op, x, rm, rv, training=True, momentum=0.1, eps=1e-5, weight=None, bias=None):
    if op == "batch_norm":
        return bnk.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    if op == "noisy_batch_norm":
        return bnk.noisy_batch_norm(x, rm, rv, weight, bias, training, momentum, eps, seed=1)
    return bnk.lp_norm(x, 2, rm, rv, weight, bias, training, momentum, eps)


def _buffers(dtype=torch.float32, device="cpu"):
    return (torch.linspace(-1, 1, C, dtype=dtype, device=device),
            torch.linspace(0.5, 2, C, dtype=dtype, device=device))


def _refuses(op, exc, match, x, rm, rv, **kw):
    """``op`` raises ``exc`` matching ``match``, leaving rm and rv as they were."""
    before = [t.clone() if t is not None else None for t in (rm, rv)]
    with pytest.raises(exc, match=match) as info:
        _call(op, x, rm, rv, **kw)
    assert isinstance(info.value, RuntimeError), "not catchable as torch's errors are"
    for t, b in zip((rm, rv), before):
        if t is not None:
            assert torch.equal(t, b), "a failed call changed a running buffer"


def _module_refuses(m, x, exc, match):
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=match) as info:
        m(x)
    assert isinstance(info.value, RuntimeError), "not catchable as torch's errors are"
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"a failed call changed the buffer {k}"


@pytest.fixture(autouse=True)
def backend():
    """Validation comes before any backend runs, so the fast reference backend serves here;
    test_triton_plan_checks_the_scalars_too covers a cached Triton plan."""
    use_backend("reference")
    return "reference"


# ----------------------------------------------------------------------------- one value


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1)], ids=["1xC", "1xCx1x1"])
def test_training_with_one_value_per_channel(op, shape, backend):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(x, *_buffers(), training=True)  # torch refuses it too
    _refuses(op, ValueError, r"Expected more than 1 value per channel when training.*"
             r"N \* prod\(spatial\) >= 2, or use eval mode", x, *_buffers())
    _call(op, x, *_buffers(), training=False)  # eval takes it, as torch's


@pytest.mark.parametrize("cls", MODULES[:3])
def test_module_with_one_value_per_channel_keeps_its_buffers(cls):
    m = cls(C, momentum=None)
    m(torch.randn(4, C, 2, 2))
    _module_refuses(m, torch.randn(1, C, 1, 1), ValueError, "Expected more than 1 value")
    assert int(m.num_batches_tracked) == 1  # torch's module would have counted it


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(op, dtype, backend):
    x = torch.ones(4, C, 2).to(dtype)
    with pytest.raises((RuntimeError, NotImplementedError)):
        F.batch_norm(x, *_buffers(), training=True)  # torch refuses it too
    _refuses(op, TypeError, rf"unsupported input dtype {dtype}.*x\.float\(\)", x, *_buffers())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_integer_per_channel_tensor(op, name, backend):
    x = torch.randn(4, C, 2)
    rm, rv = _buffers()
    bad = torch.ones(C, dtype=torch.int64)
    kw = {}
    if name == "running_mean":
        rm = bad
    elif name == "running_var":
        rv = bad
    else:
        kw[name] = bad
    label = {"running_var": "running_scale"}.get(name, name) if op == "lp_norm" else name
    _refuses(op, TypeError, rf"{label} must be a floating-point tensor, got torch.int64 "
             rf"\(convert it, e\.g\. {label}\.float\(\)\)", x, rm, rv, **kw)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_dtype,buf_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.float16),
    (torch.float64, torch.float32), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float64)])
def test_running_buffers_of_another_dtype(op, x_dtype, buf_dtype, backend):
    x = torch.randn(4, C, 2).to(x_dtype)
    rm, rv = _buffers(buf_dtype)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, *_buffers(buf_dtype), training=True)  # torch refuses it too
    name = "running_mean"
    _refuses(op, TypeError, rf"{name} is {buf_dtype} but the input is {x_dtype}.*"
             rf"convert with {name}\.to\({x_dtype}\)", x, rm, rv)


@pytest.mark.parametrize("op", OPS)
def test_per_channel_tensors_of_two_dtypes(op, backend):
    """float16 input with float32 weight (allowed, as torch's mixed precision) but float16
    running statistics: torch refuses the mix, and so do we."""
    x = torch.randn(4, C, 2).half()
    w = torch.ones(C)
    rm, rv = _buffers(torch.float16)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm.clone(), rv.clone(), w, None, training=True)
    second = "running_scale" if op == "lp_norm" else "running_var"
    with pytest.raises(TypeError, match=r"weight is torch.float32 but running_mean is "
                       r"torch.float16.*share one dtype"):
        _call(op, x, rm, rv, weight=w)
    _refuses(op, TypeError, rf"{second} is torch.float32 but running_mean is torch.float16",
             x, rm, rv.float())


def test_mixed_precision_is_accepted():
    """float16/bfloat16 input with float32 parameters and running statistics: torch's mixed
    precision, accepted (and exercised across the suite)."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, C, 2).to(dtype)
        for op in OPS:
            y = _call(op, x, *_buffers(), weight=torch.ones(C), bias=torch.zeros(C))
            assert y.dtype == dtype


def test_noisy_eval_without_affine_keeps_one_dtype():
    """Noisy eval makes the missing weight/bias of the noise's expectation in the running
    statistics' dtype, so a float16 module with affine=False still runs in eval."""
    m = bnk.NoisyBatchNorm2d(C, affine=False).half().eval()
    assert m(torch.randn(4, C, 2, 2).half()).dtype == torch.float16


# ----------------------------------------------------------------------------- devices, sizes


@pytest.mark.parametrize("op", OPS)
def test_running_buffers_on_another_device(op, backend):
    """The meta device stands in for another device (this machine has one)."""
    x = torch.randn(4, C, 2)
    rm, rv = _buffers(device="meta")
    with pytest.raises(ValueError, match=r"running_mean is on meta but the input is on cpu.*"
                       r"running_mean\.to\(x\.device\)"):
        _call(op, x, rm, rv)
    rm, rv = _buffers()
    _refuses(op, ValueError, r"weight is on meta but the input is on cpu", x, rm, rv,
             weight=torch.ones(C, device="meta"))


@pytest.mark.parametrize("op", OPS)
def test_mismatched_channels(op, backend):
    x = torch.randn(4, 5, 2)
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 3"):
        F.batch_norm(x, *_buffers(), training=True)  # torch refuses it too
    _refuses(op, ValueError, r"running_mean should contain 5 elements \(one per channel of the "
             r"input, shape \(4, 5, 2\)\), not 3", x, *_buffers())


@pytest.mark.parametrize("cls", MODULES)
def test_module_with_mismatched_channels(cls):
    m = cls(C)
    _module_refuses(m, torch.randn(4, 5, 2, 2), ValueError,
                    r"input has 5 channels \(shape \(4, 5, 2, 2\)\) but the module was built "
                    r"for num_features=3")


# ----------------------------------------------------------------------------- eps, momentum


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("eps", [-1e-5, 0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("cached", [False, True], ids=["first-call", "cached-plan"])
def test_bad_eps(op, eps, cached, backend):
    x = torch.randn(4, C, 2)
    rm, rv = _buffers()
    if cached:  # the same signature ran before: the plan is cached, the scalars still checked
        _call(op, x, rm.clone(), rv.clone())
    if eps < 0:
        with pytest.raises(ValueError, match="eps must be positive"):
            F.batch_norm(x, rm.clone(), rv.clone(), training=True, eps=eps)  # torch too
    _refuses(op, ValueError, rf"eps must be a positive finite number, got {eps}", x, rm, rv,
             eps=eps)


@pytest.mark.parametrize("cls", MODULES)
def test_module_bad_eps(cls):
    """Refused at construction (torch's modules take eps=-1 and fail in the forward), and when
    set on a module afterwards, in the forward, with the buffers kept."""
    with pytest.raises(ValueError, match=r"eps must be a positive finite number, got -1"):
        cls(C, eps=-1)
    m = cls(C)
    m.eps = -1.0
    _module_refuses(m, torch.randn(4, C, 2, 2), ValueError, "eps must be a positive finite")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("cached", [False, True], ids=["first-call", "cached-plan"])
def test_momentum_outside_0_1(op, momentum, cached, backend):
    """torch's F.batch_norm takes any momentum (1.5 extrapolates past the batch statistics);
    ours refuses what is not an average of old and new statistics, naming the range."""
    x = torch.randn(4, C, 2)
    rm, rv = _buffers()
    if cached:
        _call(op, x, rm.clone(), rv.clone())
    _refuses(op, ValueError, rf"momentum must be in \[0, 1\], got {momentum}", x, rm, rv,
             momentum=momentum)


@pytest.mark.parametrize("cls", MODULES)
def test_module_momentum_outside_0_1(cls):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None, got 1.5"):
        cls(C, momentum=1.5)
    m = cls(C)
    m(torch.randn(4, C, 2, 2))
    m.momentum = 2.0
    _module_refuses(m, torch.randn(4, C, 2, 2), ValueError, r"momentum must be in \[0, 1\]")
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("plan_backend", ["triton", "cpu"])
@pytest.mark.parametrize("op", OPS)
def test_triton_plan_checks_the_scalars_too(op, plan_backend):
    """A cached plan of the fast backends (Triton's; the cpu backend's C kernels) refuses bad
    scalars as the first call does, buffers untouched."""
    use_backend(plan_backend)
    x = torch.randn(4, C, 2)
    rm, rv = _buffers()
    _call(op, x, rm.clone(), rv.clone())
    _refuses(op, ValueError, "momentum must be in", x, rm, rv, momentum=1.5)
    _refuses(op, ValueError, "eps must be a positive finite number", x, rm, rv, eps=-1.0)


def test_torch_module_loses_its_count_where_ours_does_not():
    """What "nothing is lost" adds over torch: its module counts the batch before the op
    fails."""
    ref, ours = nn.BatchNorm2d(C), bnk.BatchNorm2d(C)
    for m in (ref, ours):
        with pytest.raises(ValueError):
            m(torch.randn(1, C, 1, 1))
    assert int(ref.num_batches_tracked) == 1 and int(ours.num_batches_tracked) == 0
