"""bnkernels under ``torch.compile``: the ops are registered ``torch.library`` ops, so a model
with bnkernels' layers compiles as one graph (``fullgraph=True``), training and eval.

    python examples/compile.py                          # CPU, the inductor backend
    python examples/compile.py --backend aot_eager      # no C++ compiler needed (faster start)
    python examples/compile.py --device cuda --batch 256 --size 32

The script compiles a small CNN built with ``bnk.BatchNorm2d`` (fused ReLU) and
``bnk.NoisyBatchNorm2d``, runs training steps eagerly and compiled from the same weights, and
checks that losses, gradients and running statistics agree.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import bnkernels as bnk


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        bnk.BatchNorm2d(width, activation="relu"),           # BatchNorm + ReLU in one kernel
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        bnk.NoisyBatchNorm2d(width, seed=1, activation="relu"),  # the paper's noisy BatchNorm
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    eager = make_model(args.width).to(args.device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=args.backend, fullgraph=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)

    for step in range(args.steps):
        losses, grads = [], []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            losses.append(loss.item())
            grads.append(next(m.parameters()).grad.clone())
            with torch.no_grad():
                for prm in m.parameters():
                    prm -= 0.05 * prm.grad
        gdiff = (grads[0] - grads[1]).abs().max().item()
        print(f"step {step}: loss eager {losses[0]:.6f} compiled {losses[1]:.6f}; "
              f"max |grad diff| {gdiff:.1e}")
        if abs(losses[0] - losses[1]) > 1e-4 or gdiff > 1e-4:
            print("eager and compiled differ")
            return 1
    for name, buf in eager.named_buffers():
        other = dict(compiled_model.named_buffers())[name]
        if not torch.allclose(buf.float(), other.float(), rtol=1e-4, atol=1e-5):
            print(f"buffer {name} differs")
            return 1
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        diff = (eager(x) - compiled(x)).abs().max().item()
    print(f"eval: max |eager - compiled| {diff:.1e}; running statistics equal")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
