"""Activation distributions over training (Figs. 1c, 2, 7, 8, 14).

The activation of weight layer i is what its ReLU sees: the output of the normalization that
follows it (for the standard network, where that is ``nn.Identity``, the weight layer's own
output; for noisy BatchNorm, after the noise). A few random units (channels) per layer are
fixed once from a seed; for each, the distribution over the batch (batch, height and width for
conv layers) is summarized by its mean, variance and quantiles. Recorded at two successive
steps, the records give the step-to-step change of the first two moments (Fig. 8).

With ``inputs=True`` the sampler also records, as kind "act_in", the same units at the
normalization's input (the weight layer's output, before the normalization): the distribution
of layer inputs "as considered in [10]" (Ioffe and Szegedy), where a normalization layer
cannot fix the moments itself. In the standard network both sites are the same and only
"act" is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import Snapshot, is_weight_layer, weight_layers

QUANTILES = (0.01, 0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99)
"""Quantiles kept per unit and step (the shaded bands of the distribution plots)."""


def activation_site(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is the activation of weight layer ``layer`` (from 1): the
    module right after it in its ``nn.Sequential`` when that is not another weight layer (its
    normalization, or ``nn.Identity``), else the weight layer itself."""
    layers = weight_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(f"activation_site: layer {layer} out of range 1..{len(layers)}")
    target = layers[layer - 1]
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.children())
            for j, child in enumerate(children):
                if child is target and j + 1 < len(children) \
                        and not is_weight_layer(children[j + 1]) \
                        and not isinstance(children[j + 1], (nn.ReLU, nn.MaxPool2d)):
                    return children[j + 1]
    return target


def summarize(values: torch.Tensor) -> dict:
    """Mean, (biased) variance and :data:`QUANTILES` of each row of ``values`` [units, n]."""
    v = values.detach().double()
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype, device=v.device), dim=1)
    return {"mean": v.mean(1).tolist(), "var": v.var(1, unbiased=False).tolist(),
            "quantiles": q.T.tolist()}


def unit_values(out: torch.Tensor, units: Sequence[int]) -> torch.Tensor:
    """[units, batch * spatial]: each unit's (channel's) values over batch and space."""
    sel = out.detach()[:, list(units)]
    return sel.transpose(0, 1).reshape(len(units), -1)


@dataclass
class ActivationSampler:
    """Forward hooks that, while armed, summarize ``units`` random channels of each of
    ``layers`` on every forward; ``collect()`` returns and clears the records.

    Units are drawn once from ``seed``, per layer, so a resumed run follows the same units."""

    model: nn.Module
    layers: Sequence[int]
    units: int = 3
    seed: int = 0
    inputs: bool = False  # also record the normalization's input (kind "act_in")

    def __post_init__(self):
        n = len(weight_layers(self.model))
        self.layers = [i for i in self.layers if 1 <= i <= n]
        self.armed = False
        self._records: list[dict] = []
        self._handles = []
        self.unit_ids: dict[int, list[int]] = {}
        for i in self.layers:
            site = activation_site(self.model, i)
            channels = weight_layers(self.model)[i - 1].weight.shape[0]
            g = torch.Generator().manual_seed(self.seed * 7919 + i)
            k = min(self.units, channels)
            self.unit_ids[i] = sorted(torch.randperm(channels, generator=g)[:k].tolist())
            self._handles.append(site.register_forward_hook(self._hook(i)))
            layer = weight_layers(self.model)[i - 1]
            if self.inputs and site is not layer:
                self._handles.append(layer.register_forward_hook(self._hook(i, "act_in")))

    def _hook(self, layer: int, kind: str | None = None):
        def hook(module, args, out):
            if self.armed:
                rec = {"layer": layer, "units": self.unit_ids[layer]}
                if kind is not None:
                    rec["kind"] = kind
                rec.update(summarize(unit_values(out, self.unit_ids[layer])))
                self._records.append(rec)
        return hook

    def collect(self) -> list[dict]:
        records, self._records = self._records, []
        return records

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def sample_activations(model: nn.Module, inputs: torch.Tensor, layers: Iterable[int],
                       units: int = 3, seed: int = 0) -> list[dict]:
    """One forward of ``model`` on ``inputs`` (in its current mode) and the summaries of
    ``units`` random channels of each of ``layers``; the model is left as found."""
    sampler = ActivationSampler(model, list(layers), units, seed)
    sampler.armed = True
    try:
        with Snapshot(model), torch.no_grad():
            model(inputs)
        return sampler.collect()
    finally:
        sampler.remove()


def moment_changes(records: Iterable[dict]) -> list[dict]:
    """Step-to-step changes of each unit's mean and variance, from "act" records (dicts with
    step, layer, units, mean, var) at successive steps t and t + 1:
    ``[{"step": t, "layer": i, "d_mean": [|mean_{t+1} - mean_t| per unit], "d_var": [...]}]``.
    """
    by_key = {(r["layer"], r["step"]): r for r in records}
    out = []
    for (layer, step), r in sorted(by_key.items()):
        nxt = by_key.get((layer, step + 1))
        if nxt is None or nxt["units"] != r["units"]:
            continue
        out.append({"step": step, "layer": layer,
                    "d_mean": [abs(a - b) for a, b in zip(nxt["mean"], r["mean"])],
                    "d_var": [abs(a - b) for a, b in zip(nxt["var"], r["var"])]})
    return out
