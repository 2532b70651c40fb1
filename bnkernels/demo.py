"""A short demo: the same small CNN trained with torch's BatchNorm2d and with bnkernels'
BatchNorm2d (fused ReLU), side by side, on a fixed synthetic task.

It prints the two loss curves and how far weights and running statistics drifted apart, and
returns 0 when they agree within tolerance.

The backend is bnkernels' own choice ("auto"): on a GPU the fast kernels; without one, the
reference backend (bnkernels' CPU path), or the Triton kernels in the interpreter when
TRITON_INTERPRET=1 was set before the process started. ``backend="triton"`` asks for the Triton
kernels: without a GPU they run in the interpreter (slow, but the same kernels a GPU runs), in
a child process started with TRITON_INTERPRET=1 when this process can no longer switch the
interpreter on (``@triton.jit`` functions, Triton's own included, are built for the compiler or
the interpreter when triton is first imported, which importing bnkernels does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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


DEMO_BACKENDS = ("auto", "triton", "cpu", "reference")
_CHILD = "BNKERNELS_DEMO_INTERPRETER_CHILD"  # set in the child process that reruns the demo


def triton_interpreter_state() -> str:
    """Whether bnkernels' Triton kernels run in the interpreter in this process:

    - "on": they do (TRITON_INTERPRET=1 was set before triton was imported);
    - "switchable": triton is not imported yet, so setting TRITON_INTERPRET=1 now turns the
      interpreter on;
    - "off": triton was imported without the interpreter; only a new process can run the
      kernels on the CPU.
    """
    if "triton.language" not in sys.modules:
        return "on" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "switchable"
    from .backends import backend
    from .backends.triton import interpreter_mismatch

    on = backend("triton").interpreting() and interpreter_mismatch() is None
    return "on" if on else "off"


def _rerun_with_interpreter(steps: int, seed: int, lr: float) -> int:
    """This demo with the Triton kernels, in a child process that has the interpreter on from
    its start; returns the child's exit status."""
    root = str(Path(__file__).resolve().parents[1])  # the bnkernels this process runs
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("BNKERNELS_BACKEND", None)
    env[_CHILD] = "1"
    print("bnkernels demo: no GPU; running the Triton kernels in the interpreter, in a new "
          "process started with TRITON_INTERPRET=1 (this one imported triton without it)",
          flush=True)
    cmd = [sys.executable, "-m", "bnkernels", "demo", "--steps", str(steps), "--seed", str(seed),
           "--lr", repr(lr), "--backend", "triton"]
    return subprocess.call(cmd, env=env)


def run_demo(steps: int = 20, seed: int = 0, lr: float = 0.1, backend: str = "auto") -> int:
    """Train both models for ``steps`` SGD steps; 0 when they match, 1 when not.

    ``backend``: "auto" (bnkernels' choice), "triton" (the Triton kernels; the interpreter
    without a GPU), "cpu" (the C kernels of CPU tensors) or "reference"."""
    if backend not in DEMO_BACKENDS:
        raise ValueError(f"run_demo: backend must be one of {DEMO_BACKENDS}, got {backend!r}")
    if steps < 1:
        raise ValueError(f"run_demo: steps must be >= 1, got {steps}")
    if backend == "triton" and not torch.cuda.is_available():
        state = triton_interpreter_state()
        if state == "switchable":
            os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels first load
        elif state == "off":
            if os.environ.get(_CHILD) == "1":
                raise RuntimeError("bnkernels demo: the Triton interpreter is off although this "
                                   "process started with TRITON_INTERPRET=1")
            return _rerun_with_interpreter(steps, seed, lr)
    import bnkernels as bnk

    if backend == "auto":  # bnkernels' own choice (set_backend / BNKERNELS_BACKEND)
        return _run(bnk, steps, seed, lr)
    previous = bnk.get_backend()
    bnk.set_backend(backend)
    try:
        return _run(bnk, steps, seed, lr)
    finally:
        bnk.set_backend(previous)


def _run(bnk, steps: int, seed: int, lr: float) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = (t.to(device) for t in _task(seed))
    torch.manual_seed(seed)
    ref = _small_cnn("torch").to(device)
    ours = _small_cnn("bnkernels").to(device)
    ours.load_state_dict(ref.state_dict())  # same parameters and buffers, same keys
    backend = bnk.backends.select("batch_norm", x).name
    where = {("triton", "cpu"): " (Triton interpreter)",
             ("cpu", "cpu"): " (its CPU path; --backend triton runs the Triton kernels "
                             "in the interpreter)",
             ("reference", "cpu"): " (the eager oracle; --backend triton runs the Triton "
                                   "kernels in the interpreter)"}.get((backend, device.type), "")
    print(f"bnkernels demo: small CNN, {steps} SGD steps (lr {lr}) on {device}, "
          f"bnkernels backend {backend!r}{where}")
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
