"""``bnk.fuse`` on small models (nn.Sequential stacks, user models with functional ReLUs and
adds, shared layers, sites that must stay), and the modules' ``forward(x, residual)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import bnkernels as bnk


def _stack():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


class _Block(nn.Module):
    """Functional ReLUs and adds, a BatchNorm called twice (once before a ReLU, once not), a
    BatchNorm whose output has two users, a broadcasting add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_two = nn.BatchNorm2d(4)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv(x)))           # bn+relu
        b = torch.add(self.bn_b(a), x).relu()          # bn+add+relu
        c = torch.relu(self.bn_shared(b))              # bn+relu
        d = self.bn_shared(c) + self.bias              # bn+add, broadcasting: computed unfused
        e = self.bn_two(d)
        return e * 2 + torch.relu(e)                   # two users: left


def _check(model, x, steps=2):
    """The fused model computes what the model computes (outputs, gradients, running
    statistics), over a few training steps, then in eval."""
    ref = bnk.convert(__import__("copy").deepcopy(model))
    fused = bnk.fuse(model)
    for _ in range(steps):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((ref, fused), xs)]
        gs = [torch.autograd.grad(o.sum(), (xi, *m.parameters()))
              for o, xi, m in zip(outs, xs, (ref, fused))]
        assert_close(outs[1], outs[0].double(), torch.float32, "out")
        for a, b in zip(gs[1], gs[0]):
            assert_close(a, b.double(), torch.float32, "grad")
    for (n, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert_close(a.double(), b.double(), torch.float32, n) if a.is_floating_point() else \
            torch.testing.assert_close(a, b)
    ref.eval()
    fused.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x).double(), torch.float32, "eval out")
    return fused


def test_sequential_stack():
    torch.manual_seed(0)
    model = _stack()
    fused = _check(model, torch.randn(4, 3, 5, 5))
    assert fused.fusion_report.count("bn+relu") == 2
    assert isinstance(fused.get_submodule("1"), bnk.BatchNorm2d)  # converted at its site
    assert type(model[1]) is nn.BatchNorm2d  # the model given is not changed
    assert fused.state_dict().keys() == model.state_dict().keys()
    model.eval()
    folded = bnk.fuse(model)
    assert folded.fusion_report.count("conv+bn (folded)") == 2
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert_close(folded(x), model(x).double(), torch.float32, "folded")
    assert bnk.fuse(model, fold=False).fusion_report.count("bn+relu") == 2


def test_user_model_sites_and_leftovers():
    torch.manual_seed(0)
    fused = _check(_Block(), torch.randn(4, 4, 3, 3))
    r = fused.fusion_report
    assert (r.count("bn+relu"), r.count("bn+add+relu"), r.count("bn+add")) == (2, 1, 1), str(r)
    left = dict(r.left)
    assert "2 users" in left["bn_two"]


def test_modules_take_a_residual_and_keep_torchs_state_dict():
    torch.manual_seed(0)
    tm = nn.BatchNorm2d(3)
    for cls, kw in ((bnk.BatchNorm2d, {}), (bnk.NoisyBatchNorm2d, {"seed": 3})):
        m = cls(3, activation="relu", **kw)
        m.load_state_dict(tm.state_dict(), strict=cls is bnk.BatchNorm2d)
        x, z = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        plain = cls(3, **kw)
        plain.load_state_dict(m.state_dict())
        y = m(x, z)
        assert_close(y, (plain(x) + z).relu().double(), torch.float32, cls.__name__)
        assert set(tm.state_dict()) <= set(m.state_dict())
    with pytest.raises(ValueError, match="residual has shape"):
        bnk.BatchNorm2d(3)(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5))


def test_untraceable_model_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(RuntimeError, match="torch.fx could not trace Branchy"):
        bnk.fuse(Branchy())
