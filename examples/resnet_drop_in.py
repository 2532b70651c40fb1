"""Drop bnkernels into a torchvision-style ResNet with ``bnk.convert`` and train it.

    python examples/resnet_drop_in.py                      # CPU, tiny sizes, seconds
    python examples/resnet_drop_in.py --device cuda --model resnet50 --size 224 --batch 64

``bnk.convert`` swaps every ``torch.nn.BatchNorm*d`` for bnkernels' twin, copying weights,
biases and running statistics (the state_dict keys stay the same, so checkpoints load either
way). The script checks that the converted model computes what the original computes, then
trains both side by side for a few steps from the same weights and prints their losses.
It uses ``torchvision.models`` when torchvision is installed (no weights are downloaded) and
otherwise a small ResNet of the same structure, built here.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import bnkernels as bnk


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, plus the (downsampled) input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def small_resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A ResNet of torchvision's structure (stem, four stages of BasicBlocks, pool, fc)."""
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, stride in enumerate((1, 2, 2, 2)):
        cout = width * 2**i
        layers.append(BasicBlock(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build(name: str, num_classes: int) -> nn.Module:
    if name == "small":
        return small_resnet(num_classes)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a torchvision.models name (resnet18, resnet50, ...) or 'small' "
                        "(default: resnet18 if torchvision is installed, else small)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16, help="input height and width")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.model is None:
        try:
            import torchvision  # noqa: F401

            args.model = "resnet18"
        except ImportError:
            args.model = "small"

    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ref = build(args.model, 10).to(args.device, memory_format=fmt)
    model = bnk.convert(copy.deepcopy(ref))  # the drop-in: one line
    n = sum(isinstance(m, bnk.BatchNorm2d) for m in model.modules())
    assert n > 0 and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    print(f"{args.model}: {n} BatchNorm2d layers converted to bnk.BatchNorm2d "
          f"(backend for this device: {bnk.get_backend()})")

    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).to(
        memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, model)]
    for step in range(args.steps):
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"step {step}: loss torch {losses[0]:.5f}  bnkernels {losses[1]:.5f}")
        if abs(losses[0] - losses[1]) > 1e-3 * max(1.0, abs(losses[0])):
            print("the losses differ more than expected")
            return 1
    ref.eval()
    model.eval()
    with torch.no_grad():
        diff = (ref(x) - model(x)).abs().max().item()
    print(f"eval: max |torch - bnkernels| of the logits after {args.steps} steps: {diff:.2e}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
