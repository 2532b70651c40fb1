"""A short demo: the same small CNN trained with torch's BatchNorm2d and with bnkernels'
BatchNorm2d (fused ReLU), side by side, on a fixed synthetic task.

It prints the two loss curves and how far weights and running statistics drifted apart, and
returns 0 when they agree within tolerance. Without a GPU the Triton kernels run in the
interpreter (slow, but the same kernels a GPU runs).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def _small_cnn(norm: str, channels: int = 8, classes: int = 4) -> nn.Module:
    import bnkernels as bnk

    def block(cin, cout):
        if norm == "torch":
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU()]
        # The ReLU is fused into the normalization; Identity keeps the layer indices (and so
        # the state_dict keys) the same as the torch model's.
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                bnk.BatchNorm2d(cout, activation="relu"), nn.Identity()]

    return nn.Sequential(
        *block(3, channels), nn.MaxPool2d(2), *block(channels, 2 * channels),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, classes))


def _task(seed: int, n: int = 32, size: int = 12, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    teacher = torch.randn(3 * size * size, classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x, y


def run_demo(steps: int = 20, seed: int = 0, lr: float = 0.1) -> int:
    if not torch.cuda.is_available():
        # Must be set before bnkernels' Triton kernels are first loaded.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import bnkernels as bnk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = (t.to(device) for t in _task(seed))
    torch.manual_seed(seed)
    ref = _small_cnn("torch").to(device)
    ours = _small_cnn("bnkernels").to(device)
    ours.load_state_dict(ref.state_dict())  # same parameters and buffers, same keys
    backend = bnk.backends.select("batch_norm", x).name
    print(f"bnkernels demo: small CNN, {steps} SGD steps (lr {lr}) on {device}, "
          f"bnkernels backend {backend!r}"
          + (" (Triton interpreter)" if backend == "triton" and device.type == "cpu" else ""))
    print(f"{'step':>4}  {'loss torch':>11}  {'loss bnkernels':>14}  {'|diff|':>9}")
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (ref, ours)]
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    for step in range(steps):
        losses = []
        for model, opt in zip((ref, ours), opts):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diff = abs(losses[0] - losses[1])
        print(f"{step:>4}  {losses[0]:>11.6f}  {losses[1]:>14.6f}  {diff:>9.2e}")
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    worst = max(
        float((sd_ours[k].double() - sd_ref[k].double()).abs().max()
              / max(1.0, float(sd_ref[k].double().abs().max())))
        for k in sd_ref if sd_ref[k].is_floating_point())
    ref.eval()
    ours.eval()
    with torch.no_grad():
        eval_diff = float((ours(x) - ref(x)).abs().max())
    ok = worst < 1e-3 and eval_diff < 1e-3
    print(f"after {steps} steps ({time.time() - t0:.1f}s): max relative difference of weights "
          f"and running statistics {worst:.2e}; eval-mode logits differ by {eval_diff:.2e}: "
          + ("MATCH" if ok else "MISMATCH"))
    return 0 if ok else 1
