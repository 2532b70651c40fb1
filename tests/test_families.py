"""Op families through their descriptors: a new family defined here alone (no edit under
bnkernels/), with reference formulas only -- mean-only centering with a running mean,
y = w * (x - mean) + b -- gets the functional op, a module, autograd (gradcheck), torch.compile
through its registered op and a clear error for the double backward it declines; an op no
family names is an error everywhere."""

import pytest
import torch

import bnkernels as bnk
from bnkernels import backends, families
from bnkernels.backends.plan import Saved, Signature
from bnkernels.functional import norm

OP = "test_mean_center"


def _dims(x):
    return [0, *range(2, x.dim())]


def _chan(t, x):
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


class MeanCenterPlan:
    """The family's reference plan (the Plan protocol): saved = (mean, scale = 1)."""

    def __init__(self, sig):
        self.sig = sig
        self.training = sig.training

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        running_mean, _, _, momentum, _, _, counter = call
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if counter is not None:
            counter.add_(1)
        if self.training:
            mean = x.to(acc).mean(_dims(x))
            if running_mean is not None:
                running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
        else:
            mean = running_mean.to(acc, copy=True)
        y = x.to(acc) - _chan(mean, x)
        if weight is not None:
            y = y * _chan(weight.to(acc), x)
        if bias is not None:
            y = y + _chan(bias.to(acc), x)
        return y.to(x.dtype), mean, torch.ones_like(mean), None

    def backward(self, dy, x, weight, bias, saved, needs):
        mean = saved[0]
        acc = mean.dtype
        g = dy.to(acc)
        dims = _dims(x)
        db = g.sum(dims) if needs[2] and bias is not None else None
        dw = (g * (x.to(acc) - _chan(mean, x))).sum(dims) if needs[1] and weight is not None \
            else None
        dx = None
        if needs[0]:
            gc = g - _chan(g.mean(dims), x) if self.training else g
            dx = (gc * _chan(weight.to(acc), x) if weight is not None else gc).to(x.dtype)
        return (dx, None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype))


FAMILY = families.register(families.Family(
    name=OP, plans={"reference": MeanCenterPlan}, running=("running_mean",),
    saved=("mean", "scale"), no_grads="it has no differentiable backward (a test family)"))


class MeanCenter2d(bnk.nn.FamilyNorm):
    family = OP
    _expected_dims = (4,)


def _expected(x, rm, w, b, training, momentum=0.1):
    """fp64 eager math, independent of the plan."""
    xd = x.double()
    mean = xd.mean(_dims(x)) if training else rm.double()
    new_rm = momentum * mean + (1 - momentum) * rm.double() if training else rm.double()
    return _chan(w.double(), x) * (xd - _chan(mean, x)) + _chan(b.double(), x), new_rm


def _inputs(dtype=torch.float32, shape=(4, 3, 5, 2)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 3
    w = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    b = torch.randn(shape[1], generator=g, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("training", [True, False])
def test_new_family_functional_op(training):
    x, w, b = _inputs()
    rm = torch.randn(3)
    want, want_rm = _expected(x, rm, w, b, training)
    y = norm(OP, x, rm, None, w, b, training=training, momentum=0.1)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.double(), want_rm, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one running buffer"):
        norm(OP, x, rm, torch.ones(3), w, b, training=training)


def test_new_family_module_and_selection():
    """The module has the family's buffers; "auto" picks the one backend the family has a plan
    for (the Triton interpreter is on in these tests); naming another backend says why not."""
    x, _, _ = _inputs()
    m = MeanCenter2d(3)
    assert sorted(m.state_dict()) == ["bias", "num_batches_tracked", "running_mean", "weight"]
    y = m(x)
    want, want_rm = _expected(x, torch.zeros(3), m.weight.detach(), m.bias.detach(), True)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean.double(), want_rm, rtol=1e-6, atol=1e-6)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    torch.testing.assert_close(m(x).double(), _expected(x, m.running_mean, m.weight.detach(),
                                                        m.bias.detach(), False)[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(x[0])
    bnk.set_backend("triton")
    try:
        with pytest.raises(RuntimeError, match=f"no {OP!r}|has no triton plan"):
            norm(OP, x, None, None, training=True)
    finally:
        bnk.set_backend("auto")


def test_new_family_gradcheck_and_declined_double_backward():
    x, w, b = _inputs(torch.float64, (3, 2, 4))
    for training in (True, False):
        rm = torch.randn(2, dtype=torch.float64)
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]

        def f(x, w, b, rm=rm, training=training):
            return norm(OP, x, rm.clone(), None, w, b, training=training)

        assert torch.autograd.gradcheck(f, inputs)
    xs = x.clone().requires_grad_()
    y = norm(OP, xs, None, None, w, b, training=True)
    with pytest.raises(RuntimeError, match=f"{OP}: double backward .* not supported: it has "
                                           "no differentiable backward"):
        torch.autograd.grad(y.square().sum(), xs, create_graph=True)


def test_new_family_compiles_through_its_registered_op():
    assert hasattr(torch.ops.bnkernels, OP) and hasattr(torch.ops.bnkernels, OP + "_backward")
    x, _, _ = _inputs()
    eager, compiled_module = MeanCenter2d(3), MeanCenter2d(3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    ye.square().sum().backward()
    yc.square().sum().backward()
    assert any(f"bnkernels.{OP}" in g for g in graphs), "the registered op is in the graph"
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean, rtol=0, atol=0)


def test_unknown_op_is_an_error_everywhere():
    x, w, b = _inputs()
    with pytest.raises(families.UnknownOpError, match="no op family is registered as 'nope'"):
        norm("nope", x)
    sig = Signature.of("nope", x, True)
    for name in ("reference", "triton", "cuda"):
        with pytest.raises(families.UnknownOpError, match="'nope'"):
            backends.backend(name).plan(sig)
    with pytest.raises(families.UnknownOpError):
        backends.make_plan(sig, x)
    from bnkernels import double_backward
    with pytest.raises(families.UnknownOpError):
        double_backward.grads(type("P", (), {"sig": sig})(), x, x, w, b,
                              Saved(None, None, 1e-5, None), (True, True, True))
    from bnkernels.library import OpPlan
    with pytest.raises(families.UnknownOpError):
        OpPlan("nope", True)


def test_benchmark_providers_dispatch_through_the_descriptor():
    """The benchmarks' providers serve the new family with no edit under bnkernels/: the
    bnkernels providers run its functional op (checked against fp64 eager math), the torch
    baselines plain BatchNorm, the eager composites skip it (it names none); an op no family
    names raises UnknownOpError."""
    from bnkernels.benchmarking import providers as P

    x, w, b = _inputs()
    rm = torch.randn(3)
    ref = P.PROVIDERS["bnkernels-reference"]
    assert OP in ref.ops and OP in P.ops() and OP not in P.OPS
    with ref.context():
        # the benchmark passes its two running buffers whatever the family keeps
        y = ref.forward(OP)(x, rm.clone(), torch.ones(3), w, b, True)
    torch.testing.assert_close(y.double(), _expected(x, rm, w, b, True)[0], rtol=1e-5,
                               atol=1e-5)
    assert P.PROVIDERS["torch-native"].computes(OP) == "batch_norm"
    eager = P.PROVIDERS["eager"]
    assert OP not in eager.ops
    assert eager.unavailable(torch.device("cpu"), OP) == f"eager does not implement {OP}"
    assert P.COMPILE_BASELINE[OP] == "torch-compile"
    assert P.oracle(OP, None, P.make_inputs((4, 3, 5), torch.float32, torch.contiguous_format,
                                            torch.device("cpu")), True) is None
    for call in (lambda: ref.forward("nope"), lambda: ref.computes("nope"),
                 lambda: eager.unavailable(torch.device("cpu"), "nope"),
                 lambda: P.oracle("nope", None, None, True), lambda: P.COMPILE_BASELINE["nope"]):
        with pytest.raises(families.UnknownOpError, match="'nope'"):
            call()
