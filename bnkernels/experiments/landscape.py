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

Curvature (not in the paper; PyHessian's measurements): :func:`hessian_top_eigenvalue` (power
iteration on Hessian-vector products) and :func:`hessian_trace` (Hutchinson's estimator).
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

import bnkernels as bnk

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


# ----------------------------------------------------------------------------- curvature
# The Hessian of the loss in the parameters, through Hessian-vector products (Pearlmutter's
# trick: H v = grad of (grad L . v)), as in PyHessian (Yao et al., 2020). bnkernels' ops are
# autograd Functions with once-differentiable backwards, so the products are taken on a copy
# of the model whose normalization layers run the same formulas as plain differentiable torch
# ops (bnkernels.backends.reference, the oracle every backend is tested against): the same
# function, now twice differentiable.


class TopEigen(NamedTuple):
    """The result of :func:`hessian_top_eigenvalue`."""

    value: float  # the Hessian eigenvalue of largest magnitude (|value|: the spectral norm)
    iterations: int  # Hessian-vector products used (< iters when it converged to tol)


class HessianTrace(NamedTuple):
    """The result of :func:`hessian_trace`."""

    value: float  # Hutchinson's estimate of tr(H): the mean of v^T H v over the samples
    stderr: float  # its standard error (NaN for one sample)


def _eager_factor(m: nn.Module, x: torch.Tensor) -> float:
    """torch's _BatchNorm rule for the running-statistics factor (counter updated): the
    layers' own rule (where the layers leave the count to their kernels, it is made here)."""
    from bnkernels.nn import _running

    _, _, _, factor, counter = _running(m, x, None, None)
    if counter is not None:
        counter.add_(1)
    return factor


def _eager_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
    """bnkernels.BatchNorm*d / NoisyBatchNorm*d forward on the reference formulas."""
    from bnkernels.backends import reference

    noisy = isinstance(self, _NOISY)
    factor = _eager_factor(self, x)
    training = self.training or (self.running_mean is None and self.running_var is None)
    track = not self.training or self.track_running_stats
    noise = (self.noise, self.seed, self.noise_step) if noisy and self.training else None
    weight, bias = self.weight, self.bias
    if noisy and not self.training:  # eval: the noise's expectation, as the layer computes it
        weight, bias = bnk.functional.expected_noise_affine(self.noise, weight, bias, x)
    y, _, _ = reference.batch_norm_reference_fwd(
        x, self.running_mean if track else None, self.running_var if track else None,
        weight, bias, training, factor, self.eps, self.activation, noise)
    if noisy and self.training:
        self.noise_step.add_(1)
    return y


def _eager_lp_norm(self, x: torch.Tensor) -> torch.Tensor:
    """bnkernels.LpNorm*d forward on the reference formulas."""
    from bnkernels.backends import reference

    factor = _eager_factor(self, x)
    training = self.training or self.running_mean is None
    track = not self.training or self.track_running_stats
    y, _, _ = reference.lp_norm_reference_fwd(
        x, self.p, self.running_mean if track else None, self.running_scale if track else None,
        self.weight, self.bias, training, factor, self.eps, self.centered)
    return y


_NOISY = (bnk.NoisyBatchNorm1d, bnk.NoisyBatchNorm2d, bnk.NoisyBatchNorm3d)
_BN = (bnk.BatchNorm1d, bnk.BatchNorm2d, bnk.BatchNorm3d, *_NOISY)
_LPN = (bnk.LpNorm1d, bnk.LpNorm2d, bnk.LpNorm3d)


def twice_differentiable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (same parameters' values, buffers, modes, noise steps) in
    which every bnkernels normalization layer computes its forward with the reference
    formulas as ordinary autograd-traced torch ops, so that double backward (Hessian-vector
    products) works. The function computed is the same: on the CPU the reference backend is
    what the layers run anyway (bit-identical), elsewhere it is the oracle the fast backends
    are tested against. bnkernels.SyncBatchNorm is not replaced (it is single-process
    BatchNorm only outside a multi-process group); torch's own layers need nothing."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, _BN):
            m.forward = types.MethodType(_eager_batch_norm, m)
        elif isinstance(m, _LPN):
            m.forward = types.MethodType(_eager_lp_norm, m)
    return twin


def _hessian_setup(model: nn.Module, loss_fn, inputs, targets):
    """(params, grads with a graph) of the twice-differentiable copy at the model's point,
    in the model's current modes and with its buffers as found."""
    twin = twice_differentiable_copy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    if not params:
        raise ValueError("hessian: the model has no parameter that requires a gradient")
    with torch.enable_grad():
        loss = loss_fn(twin(inputs), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, grads


def _hvp(params, grads, v):
    with torch.enable_grad():
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True,
                                 allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def hessian_top_eigenvalue(model: nn.Module, loss_fn, inputs: torch.Tensor,
                           targets: torch.Tensor, iters: int = 100, tol: float = 1e-3,
                           seed: int = 0) -> TopEigen:
    """The top eigenvalue of the Hessian of ``loss_fn(model(inputs), targets)`` with respect
    to every parameter that requires a gradient, by power iteration on Hessian-vector
    products, as PyHessian computes it: v <- H v / ||H v|| from a Gaussian start drawn from
    ``seed``, until the Rayleigh quotient v^T H v changes by less than ``tol`` relative to its
    size (|new - old| / (|old| + 1e-6) < tol) or ``iters`` products were taken.

    Power iteration finds the eigenvalue of largest magnitude, so ``value`` is signed: its
    absolute value is the Hessian's spectral norm, the local smoothness constant (beta) of
    the loss; it is negative where negative curvature dominates (as in BatchNorm networks at
    initialization). Returns ``TopEigen(value, iterations)``. The model is evaluated in its
    current train/eval mode with its buffers as found (so batch statistics and the noise of
    noisy BatchNorm are those of a training step at this point) and left exactly as found:
    the products are taken on :func:`twice_differentiable_copy`."""
    if iters < 1:
        raise ValueError(f"hessian_top_eigenvalue: iters must be >= 1, got {iters}")
    if not tol >= 0:
        raise ValueError(f"hessian_top_eigenvalue: tol must be >= 0, got {tol}")
    params, grads = _hessian_setup(model, loss_fn, inputs, targets)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eig = math.nan
    for it in range(1, iters + 1):
        hv = _hvp(params, grads, v)
        new = _dot(v, hv)  # the Rayleigh quotient at the unit vector v
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0 or not math.isfinite(norm):
            return TopEigen(new, it)
        v = [x / norm for x in hv]
        if it > 1 and abs(new - eig) / (abs(eig) + 1e-6) < tol:
            return TopEigen(new, it)
        eig = new
    return TopEigen(eig, iters)


def hessian_trace(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                  samples: int = 10, seed: int = 0) -> HessianTrace:
    """Hutchinson's estimate of the Hessian's trace: the mean of v^T H v over ``samples``
    Rademacher vectors v (entries +-1) drawn from ``seed``, with its standard error. Same
    point, modes and guarantees as :func:`hessian_top_eigenvalue`."""
    if samples < 1:
        raise ValueError(f"hessian_trace: samples must be >= 1, got {samples}")
    params, grads = _hessian_setup(model, loss_fn, inputs, targets)
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p)
             for p in params]
        vals.append(_dot(v, _hvp(params, grads, v)))
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return HessianTrace(mean, math.nan)
    var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)
    return HessianTrace(mean, math.sqrt(var / len(vals)))
