"""Internal covariate shift in the optimization sense (Definition 2.1 of the paper).

For weight layer i at step t, on the same batch (x_t, y_t)::

    G_i  = grad_{W_i} L(W_1^t, ..., W_k^t)
    G'_i = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

where W_j^{t+1} = W_j^t - lr * G_j is this step's plain-SGD update of layer j (computed from
the same gradient as G). ICS is ||G_i - G'_i||_2; cos(G_i, G'_i) is reported beside it.

Here "layer j" is weight layer j (Linear/Conv, forward order, from 1) with its own weight and
bias, together with the parameters of the modules between it and the next weight layer (its
normalization's gamma and beta), since they too are updated by the step before layer j + 1
sees its input. G_i is the gradient of weight layer i's own parameters (weight, and bias if
any). Every forward runs in the model's current mode with the buffers (running statistics,
noisy BatchNorm's step) as found, so G and every G' see the same batch statistics' update rule
and the same noise; the model is left exactly as found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import Snapshot, forward_layout


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double() for g in grads])


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def internal_covariate_shift(model: nn.Module, loss_fn, inputs: torch.Tensor,
                             targets: torch.Tensor, lr: float,
                             layers: Sequence[int] | None = None) -> list[dict]:
    """ICS of ``model`` on the batch (``inputs``, ``targets``) for an SGD step of size ``lr``.

    ``layers``: weight-layer numbers (from 1, forward order); None for all. Returns, in
    increasing layer order, ``[{"layer": i, "l2": ||G - G'||_2, "cosine": cos(G, G')}]``.
    ``model`` (parameters, buffers, modes, gradients) and the RNG state are left as found."""
    snap = Snapshot(model)
    try:
        with torch.enable_grad():
            weight_layers, blocks, loss = forward_layout(
                model, lambda: loss_fn(model(inputs), targets))
            k = len(weight_layers)
            wanted = sorted(set(range(1, k + 1) if layers is None else layers))
            bad = [i for i in wanted if not 1 <= i <= k]
            if bad:
                raise ValueError(f"internal_covariate_shift: layers {bad} out of range: the "
                                 f"model has {k} weight layers (numbered 1..{k})")
            all_params = [p for block in blocks for p in block]
            grad_of = dict(zip(map(id, all_params), _grads(loss, all_params)))
            own = [[p for p in m.parameters(recurse=False) if p.requires_grad]
                   for m in weight_layers]
            results = []
            updated = 0  # layers 1..updated carry their step-(t+1) values
            for i in wanted:
                g = _flat(grad_of[id(p)] for p in own[i - 1])
                with torch.no_grad():
                    while updated < i - 1:
                        for p in blocks[updated]:
                            p.sub_(lr * grad_of[id(p)])
                        updated += 1
                if updated == 0:
                    g2 = g  # nothing precedes layer 1: G' is G by definition
                else:
                    snap.restore_buffers()
                    loss2 = loss_fn(model(inputs), targets)
                    g2 = _flat(_grads(loss2, own[i - 1]))
                denom = g.norm() * g2.norm()
                cosine = float(g @ g2 / denom) if denom > 0 else float("nan")
                results.append({"layer": i, "l2": float((g - g2).norm()), "cosine": cosine})
            return results
    finally:
        snap.restore()
