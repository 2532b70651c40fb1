"""Probes of the optimization landscape along the gradient (Section 3.2, Appendix A.2.2).

At weights w with gradient g = grad L(w) on the batch, and a direction d (g itself, or a random
Gaussian direction scaled to ||g||), for each step length eta::

    loss(eta)       = L(w - eta d)
    grad_diff(eta)  = || grad L(w) - grad L(w - eta d) ||_2        (gradient predictiveness)
    beta(eta)       = grad_diff(eta) / || eta d ||_2

and the summaries the paper plots: the loss band (min, max of loss(eta) over the probed
points), the gradient-predictiveness band (min, max of grad_diff), and the "effective"
beta-smoothness max_eta beta(eta). Not a training step: the model is left exactly as found
(weights, buffers, modes, RNG), and every evaluation sees the buffers as found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .models import Snapshot

DIRECTIONS = ("gradient", "random")


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for p, g in zip(params, gs)])


def _nan_or(reduce, values: list[float]) -> float:
    """``reduce(values)``, or NaN if any value is NaN (a diverged point must show)."""
    return math.nan if any(math.isnan(v) for v in values) else reduce(values)


def probe(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
          step_sizes: Sequence[float], direction: str = "gradient", *, seed: int = 0) -> dict:
    """Loss and gradient of ``model`` at w - eta * d for each eta in ``step_sizes``.

    ``direction``: "gradient" (d = g, the paper's figures) or "random" (d ~ N(0, I) rescaled
    to ||g||, drawn from a generator seeded with ``seed``). Returns ``loss_min``, ``loss_max``,
    ``grad_diff_min``, ``grad_diff_max``, ``beta_smoothness`` (max of beta(eta)), and per point
    ``step_sizes``, ``losses``, ``grad_diffs``, ``betas``; also ``loss`` and ``grad_norm`` at w
    and ``direction``. All over every parameter that requires a gradient."""
    if direction not in DIRECTIONS:
        raise ValueError(f"probe: direction must be one of {DIRECTIONS}, got {direction!r}")
    etas = [float(e) for e in step_sizes]
    if not etas or any(not e > 0 for e in etas):
        raise ValueError(f"probe: step_sizes must be positive numbers, got {step_sizes!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    snap = Snapshot(model)
    try:
        with torch.enable_grad():
            loss0 = loss_fn(model(inputs), targets)
            g = _flat_grad(loss0, params)
            if direction == "gradient":
                d = g
            else:
                gen = torch.Generator().manual_seed(seed)
                d = torch.randn(g.numel(), generator=gen, dtype=torch.float64).to(g.device)
                d = d * (g.norm() / d.norm())
            d_norm = float(d.norm())
            losses, diffs, betas = [], [], []
            for eta in etas:
                snap.restore()
                with torch.no_grad():
                    offset = 0
                    for p in params:
                        n = p.numel()
                        p.sub_((eta * d[offset:offset + n]).view_as(p).to(p.dtype))
                        offset += n
                loss = loss_fn(model(inputs), targets)
                diff = float((g - _flat_grad(loss, params)).norm())
                losses.append(float(loss.detach()))
                diffs.append(diff)
                betas.append(diff / (eta * d_norm) if d_norm > 0 else math.nan)
    finally:
        snap.restore()
    return {
        "loss_min": _nan_or(min, losses), "loss_max": _nan_or(max, losses),
        "grad_diff_min": _nan_or(min, diffs), "grad_diff_max": _nan_or(max, diffs),
        "beta_smoothness": _nan_or(max, betas),
        "loss": float(loss0.detach()), "grad_norm": float(g.norm()), "direction": direction,
        "step_sizes": etas, "losses": losses, "grad_diffs": diffs, "betas": betas,
    }
