"""torchvision's ResNet-18 and ResNet-50 (random weights) through ``bnkernels.convert`` and
``bnkernels.fuse``: the logits and every parameter's gradient are as close to the fp64 truth
as torch's own fp32 ones are (at most twice torch's error, plus one fp32 tolerance unit), in
training (forward and backward, every BN -> ReLU and BN -> add -> ReLU site fused) and in eval
(BatchNorm folded into the convolutions, the rest fused), on the reference backend with
contiguous tensors and on the Triton kernels with channels_last ones. Inputs are tiny (batch 4
at 32x32) so the interpreted kernels stay quick; see test_resnet18.py for why the comparison
is against fp64 rather than between the two fp32 results.

Gradients: in fp32, the error of the whole gradient (all parameters, relative to its norm) is
bounded by twice torch's own; in fp64, every parameter's gradient equals torch's to 1e-7 of its
size (the implementation itself, free of rounding's amplification). Per-parameter fp32 bounds
are not used, and the fp32 bound says little for ResNet-50 here: torch's own fp32 gradient is
10-40% off the fp64 one at this size (measured 0.099 contiguous, 0.42 channels_last), and a
per-parameter bound failed by chance on a fresh machine. At this size layer4's BatchNorms
normalize 4 values per channel (batch 4, 1x1), which amplifies each implementation's rounding
into the gradients of the layers around them: the per-parameter errors of two fp32 computations
are two samples of that amplification. Measured on ResNet-18 (Triton, channels_last): torch's
own error on layer4.0.conv1.weight is 0.0029 (0.0038 contiguous), bnkernels.convert without any
fusion 0.0073, fused 0.0068; over the whole model the worst relative errors are torch 2.3e-4,
converted 2.8e-4, fused 2.6e-4."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TOLERANCES, use_backend
from torch import nn

import bnkernels as bnk

torchvision = pytest.importorskip("torchvision")

CL = torch.channels_last
SITES = {"resnet18": (9, 8, 20), "resnet50": (33, 16, 53)}  # bn+relu, bn+add+relu, BN layers


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def net(request):
    """The model with running statistics from two training batches, a test batch, a fixed
    upstream gradient and a cache of torch's own results."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(num_classes=10)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return request.param, model, torch.randn(4, 3, 32, 32), torch.randn(4, 10), {}


def _run(model, x, dy, training, channels_last, dtype=torch.float32):
    """(logits, {name: grad}) of one step (grads only in training)."""
    model = copy.deepcopy(model).to(dtype).train(training)
    x = x.to(dtype)
    if channels_last:
        model, x = model.to(memory_format=CL), x.contiguous(memory_format=CL)
    if not training:
        with torch.no_grad():
            return model(x), {}
    logits = model(x)
    logits.backward(dy.to(dtype))
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _torch(net, training, channels_last, dtype):
    _, model, x, dy, cache = net
    key = (training, channels_last, dtype)
    if key not in cache:
        cache[key] = _run(model, x, dy, training, channels_last, dtype)
    return cache[key]


def _err(a, exact):
    return float((a.double() - exact).abs().max())


def _within(name, ours, theirs, exact):
    unit = TOLERANCES[torch.float32]["atol"] * max(1.0, float(exact.abs().max()))
    o, t = _err(ours, exact), _err(theirs, exact)
    assert o <= 2 * t + unit, f"{name}: ours {o:.3g} from fp64, torch's own fp32 {t:.3g}"


@pytest.mark.parametrize("backend,channels_last", [("reference", False), ("triton", True)],
                         ids=["reference-contiguous", "triton-channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-nofold"])
def test_fused_resnet_as_close_to_fp64_as_torch(net, backend, channels_last, mode):
    name, model, x, dy, _ = net
    training, fold = mode == "train", mode == "eval"
    exact, exact_grads = _torch(net, training, channels_last, torch.float64)
    theirs, their_grads = _torch(net, training, channels_last, torch.float32)
    use_backend(backend)
    ours_model = bnk.fuse(bnk.convert(copy.deepcopy(model).train(training)), fold=fold)
    report = ours_model.fusion_report
    relu_sites, add_sites, layers = SITES[name]
    if fold:
        assert report.count("conv+bn (folded)") == layers, str(report)
    else:
        assert (report.count("bn+relu"), report.count("bn+add+relu")) == (relu_sites, add_sites)
        assert set(ours_model.state_dict()) == set(model.state_dict())
    ours, our_grads = _run(ours_model, x, dy, training, channels_last)
    _within("logits", ours, theirs, exact)
    assert set(our_grads) == set(their_grads)
    if not training:
        return
    names = sorted(exact_grads)
    truth = torch.cat([exact_grads[n].flatten() for n in names])

    def whole(grads):  # the error of the whole gradient, relative to its norm
        g = torch.cat([grads[n].double().flatten() for n in names])
        return float((g - truth).norm() / truth.norm())

    ours_e, torch_e = whole(our_grads), whole(their_grads)
    assert ours_e <= 2 * torch_e + TOLERANCES[torch.float32]["atol"], (
        f"gradient error {ours_e:.3g} against torch's own fp32 {torch_e:.3g}")


def test_fused_resnet_gradients_equal_torchs_in_fp64(net):
    """The implementation itself, free of fp32 rounding's amplification: the converted and
    fused model in fp64 (reference backend) gives torch's fp64 logits and every parameter's
    gradient to 1e-7 of that gradient's size."""
    _, model, x, dy, _ = net
    exact, exact_grads = _torch(net, True, False, torch.float64)
    use_backend("reference")
    fused = bnk.fuse(bnk.convert(copy.deepcopy(model).train(True)), fold=False)
    ours, grads = _run(fused, x, dy, True, False, torch.float64)
    assert _err(ours, exact) <= 1e-9 * max(1.0, float(exact.abs().max()))
    bad = {n: f"{_err(g, exact_grads[n]):.3g}" for n, g in grads.items()
           if _err(g, exact_grads[n]) > 1e-7 * max(1e-3, float(exact_grads[n].abs().max()))}
    assert not bad, f"fp64 gradients differ from torch's: {bad}"


def test_fuse_keeps_the_original_state_dict_and_reports():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10)
    fused = bnk.fuse(model)
    assert fused.state_dict().keys() == model.state_dict().keys()
    fused.load_state_dict(model.state_dict())
    model.load_state_dict(fused.state_dict())
    assert all(type(m) is nn.BatchNorm2d for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))  # model itself untouched
    text = str(fused.fusion_report)
    assert "9 bn+relu" in text and "8 bn+add+relu" in text and "layer1.0.bn2" in text
    # the downsample branch's BatchNorm feeds the fused add as its residual: left, and said so
    assert any(n == "layer2.0.downsample.1" and "residual" in why
               for n, why in fused.fusion_report.left)
