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

Curvature (not in the paper): :func:`hessian_top_eigenvalue` (both ends of the Hessian's
spectrum by Lanczos on Hessian-vector products) and :func:`hessian_trace` (Hutchinson's
estimator, as PyHessian computes it).
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
    iterations: int  # Hessian-vector products used
    largest: float = math.nan  # the largest (algebraic) eigenvalue
    smallest: float = math.nan  # the smallest (algebraic) eigenvalue
    converged: bool = True  # both ends converged to tol (else: the Ritz values reached)


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
_BN = (bnk.BatchNorm1d, bnk.BatchNorm2d, bnk.BatchNorm3d, bnk.SyncBatchNorm, *_NOISY)
_LPN = (bnk.LpNorm1d, bnk.LpNorm2d, bnk.LpNorm3d)


def twice_differentiable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (same parameters' values, buffers, modes, noise steps) in
    which every bnkernels normalization layer computes its forward with the reference
    formulas as ordinary autograd-traced torch ops, so that double backward (Hessian-vector
    products) works. The function computed is the same up to rounding: the reference formulas
    are the oracle every fast backend (cpu, triton, cuda) is tested against.
    bnkernels.SyncBatchNorm becomes BatchNorm on this process's own input: under data-parallel
    training the copy is the network of one process's slice of the batch (the Hessian of that
    slice's loss, a local definition: no collective in its products, so the ranks cannot hang
    on one another). torch's own layers need nothing."""
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


DENSE_BELOW = 64
"""Below this many parameters the Hessian is formed whole (one product per coordinate) and
diagonalized exactly; above, Lanczos."""


def hessian_top_eigenvalue(model: nn.Module, loss_fn, inputs: torch.Tensor,
                           targets: torch.Tensor, iters: int = 100, tol: float = 1e-3,
                           seed: int = 0) -> TopEigen:
    """Both ends of the spectrum of the Hessian of ``loss_fn(model(inputs), targets)`` with
    respect to every parameter that requires a gradient, and its eigenvalue of largest
    magnitude (``value``: signed; ``|value|`` is the Hessian's spectral norm, the local
    smoothness constant beta).

    Implicitly restarted Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``, ``which="BE"``:
    the largest and the smallest eigenvalue together) on Hessian-vector products in float64,
    from a Gaussian start vector drawn from ``seed``, to relative accuracy ``tol``, with at
    most about ``iters`` products (ARPACK restarts in whole cycles; ``iterations`` is the
    count taken). Unlike power iteration, which returns a mixture when two eigenvalues of
    opposite sign have nearly the same magnitude (+833 and -838: any value between), Lanczos
    resolves both ends. When the budget runs out before either end converges, it is tried once
    more with four times the restarts at 1% accuracy; ``converged`` is then False and only
    the eigenvalues ARPACK converged are returned (one of them: taken as the largest if positive,
    the smallest if negative, the other end NaN; none: NaN). Models with fewer than
    :data:`DENSE_BELOW` parameters get the exact spectrum of the whole Hessian.

    The model is evaluated in its current train/eval mode with its buffers as found (so batch
    statistics and the noise of noisy BatchNorm are those of a training step at this point)
    and left exactly as found: the products are taken on :func:`twice_differentiable_copy`."""
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if iters < 1:
        raise ValueError(f"hessian_top_eigenvalue: iters must be >= 1, got {iters}")
    if not tol >= 0:
        raise ValueError(f"hessian_top_eigenvalue: tol must be >= 0, got {tol}")
    params, grads = _hessian_setup(model, loss_fn, inputs, targets)
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    count = 0

    def matvec(x):
        nonlocal count
        count += 1
        flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        v = [c.view_as(p).to(p) for c, p in zip(torch.split(flat, sizes), params)]
        return torch.cat([h.reshape(-1).double().cpu() for h in _hvp(params, grads, v)]).numpy()

    converged = True
    if n < DENSE_BELOW:
        H = np.stack([matvec(e) for e in np.eye(n)], axis=1)
        eig = np.linalg.eigvalsh(0.5 * (H + H.T))
        lo, hi = float(eig[0]), float(eig[-1])
    else:
        gen = torch.Generator().manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
        ncv = min(n, max(8, min(20, iters)))
        maxiter = max(1, math.ceil(max(0, iters - ncv) / (ncv - 2)))
        op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        try:
            eig = eigsh(op, k=2, which="BE", v0=v0, ncv=ncv, tol=tol, maxiter=maxiter,
                        return_eigenvectors=False)
        except ArpackNoConvergence as e:
            converged, eig = False, e.eigenvalues
        if len(eig) == 0:  # once more, with four times the restarts and at least 1% accuracy
            try:
                eig = eigsh(op, k=2, which="BE", v0=v0, ncv=ncv, tol=max(tol, 1e-2),
                            maxiter=4 * maxiter, return_eigenvectors=False)
                converged = tol >= 1e-2
            except ArpackNoConvergence as e:
                eig = e.eigenvalues if len(e.eigenvalues) > len(eig) else eig
        eig = np.sort(np.asarray(eig, dtype=np.float64))
        if eig.size == 0:
            return TopEigen(math.nan, count, math.nan, math.nan, False)
        if eig.size == 1:  # one end converged: by its sign, the largest or the smallest
            v = float(eig[0])
            return TopEigen(v, count, v if v >= 0 else math.nan, v if v < 0 else math.nan,
                            False)
        lo, hi = float(eig[0]), float(eig[-1])
    value = hi if abs(hi) >= abs(lo) else lo
    return TopEigen(value, count, hi, lo, converged)


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
