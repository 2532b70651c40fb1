"""Where bnkernels meets code written for torch: argument names, constructor signatures,
docstrings, and the error types. Reference backend, tiny tensors: about a second."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import use_backend
from torch import nn

import bnkernels as bnk


@pytest.fixture(autouse=True)
def backend():
    use_backend("reference")


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_functional_first_argument_is_input_as_torchs():
    assert _params(F.batch_norm)[:8] == _params(bnk.batch_norm)[:8]
    assert _params(bnk.batch_norm)[0] == "input"
    assert _params(bnk.noisy_batch_norm)[:8] == _params(F.batch_norm)[:8]
    assert _params(bnk.lp_norm)[0] == "input"


def test_input_by_keyword_and_by_position_agree_with_torch():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    want = F.batch_norm(input=x, running_mean=rm.clone(), running_var=rv.clone(), training=True)
    for y in (bnk.batch_norm(input=x, running_mean=rm.clone(), running_var=rv.clone(),
                             training=True),
              bnk.batch_norm(x, rm.clone(), rv.clone(), None, None, True)):
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    y = bnk.noisy_batch_norm(input=x, running_mean=None, running_var=None, training=True,
                             seed=3)
    assert y.shape == x.shape
    torch.testing.assert_close(bnk.lp_norm(input=x, p=2, training=True),
                               bnk.lp_norm(x, 2, training=True), rtol=0, atol=0)


def test_errors_are_runtime_errors_with_our_messages():
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements"):
        bnk.batch_norm(x, torch.zeros(3), torch.ones(2), training=True)
    with pytest.raises(ValueError, match="running_var should contain 3 elements"):
        bnk.batch_norm(x, torch.zeros(3), torch.ones(2), training=True)
    with pytest.raises(RuntimeError, match="unsupported input dtype"):
        bnk.batch_norm(x.int(), None, None, training=True)
    with pytest.raises(TypeError, match="unsupported input dtype"):
        bnk.batch_norm(x.int(), None, None, training=True)
    with pytest.raises(RuntimeError, match="built for num_features=4"):
        bnk.BatchNorm1d(4)(x)
    # torch raises RuntimeError for the same mistake: one except clause serves both
    for module in (nn.BatchNorm1d(4), bnk.BatchNorm1d(4)):
        with pytest.raises(RuntimeError):
            module(x)


TWINS = [(bnk.BatchNorm1d, nn.BatchNorm1d), (bnk.BatchNorm2d, nn.BatchNorm2d),
         (bnk.BatchNorm3d, nn.BatchNorm3d), (bnk.NoisyBatchNorm2d, nn.BatchNorm2d),
         (bnk.SyncBatchNorm, nn.SyncBatchNorm)]


@pytest.mark.parametrize("ours,theirs", TWINS, ids=lambda c: c.__name__)
def test_module_signatures_are_explicit_and_include_torchs(ours, theirs):
    sig = inspect.signature(ours)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    torch_sig = inspect.signature(theirs)
    for name, p in torch_sig.parameters.items():  # every torch argument, same default
        assert name in sig.parameters, name
        assert sig.parameters[name].default == p.default, name
        assert sig.parameters[name].kind == p.kind, name
    assert {"device", "dtype", "bias", "activation"} <= set(sig.parameters)
    # the docstring adds to torch's, whole
    assert ours.__doc__.startswith(f"``torch.nn.{theirs.__name__}``")
    assert inspect.getdoc(theirs) in ours.__doc__ and "activation" in ours.__doc__


def test_constructor_arguments_reach_torch():
    m = bnk.BatchNorm2d(3, 1e-3, 0.2, True, True, "cpu", torch.float64, activation="relu")
    assert (m.eps, m.momentum, m.weight.dtype, m.activation) == (1e-3, 0.2, torch.float64,
                                                                 "relu")
    m = bnk.NoisyBatchNorm1d(3, dtype=torch.float64, seed=5)
    assert m.running_mean.dtype == torch.float64 and m.seed == 5
    m = bnk.SyncBatchNorm(3, process_group=None, device="cpu", activation="relu")
    assert m.activation == "relu" and m.process_group is None
    if "bias" in inspect.signature(nn.BatchNorm2d).parameters:
        want_keys = nn.BatchNorm2d(3, bias=False).state_dict().keys()
        for cls in (bnk.BatchNorm2d, bnk.NoisyBatchNorm2d, bnk.SyncBatchNorm):
            m = cls(3, bias=False)
            assert m.bias is None and m.weight is not None
            assert set(want_keys) <= set(m.state_dict().keys())
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        want = nn.BatchNorm2d(3, bias=False, dtype=torch.float64)(x)
        got = bnk.BatchNorm2d(3, bias=False, dtype=torch.float64)(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError):
        bnk.BatchNorm2d(3, 1e-5, 0.1, True, True, None, None, False)  # bias is keyword-only
