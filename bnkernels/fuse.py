"""``bnkernels.fuse(model)``: the BatchNorm -> ReLU and BatchNorm -> add -> ReLU sites of a
model call the fused op, found by tracing the model with ``torch.fx``.

Tracing sees what the model computes, not how its modules are named or shared: torchvision's
BasicBlock and Bottleneck call one ``self.relu`` module three times, after a BatchNorm twice
and after the residual add once; ``nn.Sequential`` stacks and user models trace the same way.
The sites, in the traced graph:

* ``bn -> relu``: the BatchNorm's output goes only to a ReLU (``nn.ReLU``, ``F.relu``,
  ``torch.relu``, ``.relu()``, in place or not): one call of
  ``bnkernels.batch_norm(..., activation="relu")``.
* ``bn -> add -> relu``: the BatchNorm's output goes only to an add of two tensors (``+``,
  ``+=``, ``torch.add``, ``.add()``) whose sum goes only to a ReLU: one call with
  ``residual=`` the other operand and ``activation="relu"``. Without the ReLU (the sum used
  elsewhere too, or not by a ReLU): ``bn -> add``, the residual fused and no activation.

A torch BatchNorm at a site becomes the bnkernels layer (:func:`bnkernels.convert`, the same
parameters and buffers under the same names); bnkernels' BatchNorm*d and NoisyBatchNorm*d are
used as they are. A site calls the layer with the activation (and residual) of the site, so one
layer called at two sites, fused at one, stays right at the other. Sites left as they were: a
BatchNorm whose output has other users, SyncBatchNorm, l_p layers, a layer that already has an
activation, an add with a scalar or the BatchNorm's own output. At run time a residual of
another shape, dtype or device than the BatchNorm's input (an add that broadcasts or promotes)
is computed unfused, as the traced model would.

In eval mode (``model.training`` False), a BatchNorm whose input is a convolution's output used
by nothing else is folded into that convolution with torch's own
``torch.nn.utils.fusion.fuse_conv_bn_eval`` (exact up to rounding: the BatchNorm in eval is an
affine map per channel), unless ``fold=False``; folding changes the state_dict (the
convolution's weight and bias absorb the BatchNorm's statistics and parameters), which is why it
is an inference transform. Without folding, parameters, buffers and state_dict keys are the
original model's: a state_dict loads from and into either.

The returned ``torch.fx.GraphModule`` carries ``fusion_report`` (a :class:`FusionReport`: each
fused or folded site, and each BatchNorm left alone with the reason), which is also logged on the
``bnkernels.fuse`` logger at INFO.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import nn as bnn

log = logging.getLogger("bnkernels.fuse")

_RELU_FUNCS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FusionReport:
    """What :func:`fuse` did: ``fused`` = [(kind, layer, detail)] with kind "bn+relu",
    "bn+add+relu", "bn+add" or "conv+bn (folded)"; ``left`` = [(layer, reason)]."""

    fused: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.fused if k == kind)

    def __str__(self) -> str:
        kinds = sorted({k for k, _, _ in self.fused})
        head = ", ".join(f"{self.count(k)} {k}" for k in kinds) or "nothing fused"
        lines = [f"bnkernels.fuse: {head}; {len(self.left)} BatchNorm call(s) left as they were"]
        lines += [f"  {k}: {name} ({detail})" for k, name, detail in self.fused]
        lines += [f"  left: {name}: {why}" for name, why in self.left]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """torch's default tracer, with every normalization layer a leaf (bnkernels' layers live
    outside torch.nn, and their forward is not traceable)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.modules.batchnorm._NormBase, bnn._LpNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _fused_call(bn: nn.Module, x: torch.Tensor, residual, activation):
    """A fused site: ``act(bn(x) + residual)`` in one call of the layer's op. A residual the op
    cannot take (another shape, dtype or device: a broadcasting or promoting add) is added
    after the layer, as the traced model did."""
    if residual is None or (isinstance(residual, torch.Tensor) and residual.shape == x.shape
                            and residual.dtype == x.dtype and residual.device == x.device):
        return bn._forward(x, residual, activation)
    y = bn._forward(x, None, None) + residual
    return torch.relu(y) if activation == "relu" else y


fx.wrap("_fused_call")  # a leaf of any later trace of the fused model


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return False


def _add_other(node: fx.Node, bn: fx.Node):
    """The other operand of ``node`` if it is ``bn + other`` (either order) of two nodes,
    else None."""
    if node.kwargs:  # alpha=..., out=...
        return None
    if node.op == "call_function" and node.target in _ADD_FUNCS and len(node.args) == 2:
        a, b = node.args
    elif node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2:
        a, b = node.args
    else:
        return None
    other = b if a is bn else a if b is bn else None
    if not isinstance(other, fx.Node) or other is bn:
        return None
    return other


def _why_not(m: nn.Module):
    """Why the layer cannot take a fused call (None if it can)."""
    if isinstance(m, (nn.SyncBatchNorm, bnn.SyncBatchNorm)):
        return "SyncBatchNorm (its statistics across processes are not fused)"
    if isinstance(m, bnn._LpNorm):
        return "an l_p layer (the residual add is BatchNorm's)"
    if not isinstance(m, (nn.modules.batchnorm._BatchNorm)):
        return f"{type(m).__name__} is not a BatchNorm"
    if getattr(m, "activation", None) is not None:
        return f"it already applies activation={m.activation!r}"
    return None


def _ours(m: nn.Module) -> nn.Module:
    """The bnkernels layer of a BatchNorm (itself if it is one)."""
    if isinstance(m, bnn._BatchNormMixin):
        return m
    return bnn.convert(m, "batchnorm")


def _set_module(gm: fx.GraphModule, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _fold(gm: fx.GraphModule, modules: dict, report: FusionReport) -> None:
    """Eval: conv -> BatchNorm (the conv's output used by nothing else) folded into the conv."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target),
                                                       nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        conv_node = node.args[0] if node.args else None
        if (len(node.args) != 1 or node.kwargs or not isinstance(conv_node, fx.Node)
                or conv_node.op != "call_module" or len(conv_node.users) != 1):
            continue
        conv = modules.get(conv_node.target)
        if type(conv) not in _CONVS or bn.training or conv.training:
            continue
        why = _why_not(bn)
        if why is not None or isinstance(bn, bnn._NoisyBatchNormMixin):
            continue  # noisy BatchNorm's eval is its expectation: not torch's fold
        if bn.running_mean is None or bn.running_var is None:
            continue
        if bn.num_features != conv.out_channels:
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        _set_module(gm, conv_node.target, fused)
        modules[conv_node.target] = fused
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        report.fused.append(("conv+bn (folded)", node.target, f"into {conv_node.target}"))


def fuse(model: nn.Module, *, fold: bool = True) -> fx.GraphModule:
    """The model with its BatchNorm -> ReLU and BatchNorm -> add -> ReLU sites calling
    bnkernels' fused op (see the module docstring); in eval mode, BatchNorm folded into the
    preceding convolution where exact (``fold=False``: not). ``model`` itself is not changed
    (the result holds copies of its layers). ``result.fusion_report`` says what was fused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx cannot trace data-dependent control flow
        raise RuntimeError(
            f"fuse: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "fuse needs a model torch.fx.symbolic_trace can trace (no control flow on tensor "
            "values in forward). bnkernels.convert(model) works on any model, without the "
            "fused activation sites") from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training  # the layers keep their own modes
    modules = dict(gm.named_modules())
    report = FusionReport()
    if fold and not model.training:
        _fold(gm, modules, report)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules
                                                       .batchnorm._NormBase):
            continue
        m = modules[node.target]
        why = _why_not(m)
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "called with more than the input"
        if why is None and len(node.users) != 1:
            why = f"its output has {len(node.users)} users"
        user = next(iter(node.users)) if why is None else None
        residual = tail = None
        kind = None
        if user is not None:
            if _is_relu(user, modules):
                kind, tail = "bn+relu", user
            else:
                residual = _add_other(user, node)
                if residual is not None:
                    after = next(iter(user.users)) if len(user.users) == 1 else None
                    if after is not None and _is_relu(after, modules):
                        kind, tail = "bn+add+relu", after
                    else:
                        kind, tail = "bn+add", user
            if kind is None:
                target = getattr(user.target, "__name__", user.target)
                why = (f"its output is the residual of {user.args[0].target}'s fused call"
                       if user.target is _fused_call else
                       f"its output goes to {user.name} ({user.op} {target}): not a ReLU or "
                       "a tensor add")
        if kind is None:
            report.left.append((node.target, why))
            continue
        ours = _ours(m)
        if ours is not m:
            _set_module(gm, node.target, ours)
            modules[node.target] = ours
        activation = None if kind == "bn+add" else "relu"
        with gm.graph.inserting_before(tail):
            layer = gm.graph.get_attr(node.target)
            call = gm.graph.call_function(_fused_call, (layer, node.args[0], residual,
                                                        activation))
        tail.replace_all_uses_with(call)
        for dead in ([tail, user] if kind == "bn+add+relu" else [tail]) + [node]:
            gm.graph.erase_node(dead)
        detail = f"activation={activation}"
        if residual is not None:
            detail = f"residual={residual.name}, {detail}"
        report.fused.append((kind, node.target, detail))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.fusion_report = report
    log.info("%s", report)
    return gm


__all__ = ["FusionReport", "fuse"]
