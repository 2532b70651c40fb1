"""bnkernels.BatchNorm*d as drop-in replacements of torch's (the core cases; the modules issue
extends this to PyTorch's own sample inputs)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

import bnkernels as bnk

MODULES = [
    (bnk.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (bnk.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
    (bnk.BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 7)),
    (bnk.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 5)),
]
KWARGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]


@pytest.mark.parametrize("ours_cls,torch_cls,shape", MODULES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
def test_module_matches_torch_train_then_eval(ours_cls, torch_cls, shape, kwargs, device):
    torch.manual_seed(0)
    ref = torch_cls(shape[1], **kwargs).to(device)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = ours_cls(shape[1], **kwargs).to(device)
    assert isinstance(ours, torch_cls)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for mode in ("train", "train", "eval"):
        getattr(ref, mode)()
        getattr(ours, mode)()
        x = (torch.randn(shape, device=device) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y_ours = ref(x), ours(x2)
        dy = torch.randn_like(y_ref)
        y_ref.backward(dy)
        y_ours.backward(dy)
        assert_close(y_ours, y_ref, torch.float32, f"{mode} y")
        assert_close(x2.grad, x.grad, torch.float32, f"{mode} dx")
        for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert_close(p.grad, q.grad, torch.float32, f"{mode} grad {name}")
        for (name, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers()):
            if b.is_floating_point():
                assert_close(b, c, torch.float32, f"{mode} buffer {name}")
            else:
                assert torch.equal(b, c), name
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_channel_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match="input has 4 channels.*built for 3"):
        bnk.BatchNorm2d(3, affine=False, track_running_stats=False)(torch.randn(2, 4, 3, 3))


def test_wrong_ndim_raises_like_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        bnk.BatchNorm2d(3)(torch.randn(2, 3, 3))


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        bnk.BatchNorm2d(3, activation="tanh")


def test_fused_relu_module(device):
    torch.manual_seed(1)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(device)
    ours = bnk.BatchNorm2d(3, activation="relu").to(device)
    ours.load_state_dict(ref[0].state_dict())
    x = torch.randn(4, 3, 5, 5, device=device)
    assert_close(ours(x), ref(x), torch.float32, "y")
    assert "activation='relu'" in repr(ours)


def test_demo_runs_and_matches(capsys):
    from bnkernels.demo import run_demo

    assert run_demo(steps=2) == 0
    assert "MATCH" in capsys.readouterr().out
