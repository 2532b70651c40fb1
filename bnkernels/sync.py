"""SyncBatchNorm across processes: BatchNorm over the union of the batches of all processes
in a group, as one more op family on the route every op takes.

Its plan, :class:`SyncPlan`, follows :class:`~.backends.plan.Plan` on a BatchNorm plan's
:class:`~.backends.plan.SyncStages`, with the collectives between the stages, so
:class:`~.autograd.NormFunction` runs it as it runs every other plan. Under torch.compile,
export or a dispatch mode the call takes the traced route instead: :class:`SyncOpPlan` calls
the registered ops ``bnkernels::sync_batch_norm`` and ``bnkernels::sync_batch_norm_backward``
(the process group passed by name), whose implementations run the same :class:`SyncPlan`. A
compiler sees two opaque ops, not collectives inside an autograd Function, so
``torch.compile(bnk.SyncBatchNorm(C), fullgraph=True)`` traces.

Forward: each process computes its per-channel (count n_r, mean_r, biased var_r); they are
all-gathered and merged (Chan et al.): n = sum n_r, mean = sum n_r mean_r / n,
var = (sum n_r var_r + sum n_r (mean_r - mean)^2) / n. Running statistics get the unbiased
n / (n - 1) var. Backward: the per-channel sums [sum(g), sum(g (x - mean))] and the count are
all-reduced (one collective) and divided by n for dx; weight and bias gradients are each
process's own sums (DDP then reduces them), as in torch.nn.SyncBatchNorm. Everything stays on
the device. An empty rank contributes a count of 0.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from .autograd import NormFunction
from .backends.family import Family, register
from .backends.plan import Call, Saved, acc_dtype
from .functional import _validate_batch_norm
from .functional import sync_plan as stage_plan
from .library import forward_like, grads_like

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


class _Flags(NamedTuple):
    """What the double backward reads of a SyncBatchNorm call (its family)."""

    op: str = "sync_batch_norm"
    training: bool = True


_FLAGS = _Flags()


class SyncPlan:
    """:class:`~.backends.plan.Plan` of a SyncBatchNorm training call: ``stages`` (a BatchNorm
    plan) with the collectives over ``group`` (``world`` processes) between them."""

    sig = _FLAGS

    def __init__(self, stages, group, world: int):
        self.stages, self.group, self.world = stages, group, world

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_var, _, momentum, eps, _, counter = call
        acc = acc_dtype(x.dtype)
        C = x.shape[1]
        count = x.numel() // C
        if count > 0:
            mean, var = self.stages.stats(x)
        else:
            mean = var = torch.zeros(C, device=x.device, dtype=acc)
        local = torch.cat([torch.full((1,), float(count), device=x.device, dtype=acc),
                           mean, var])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        stats = torch.stack(gathered)  # [world, 1 + 2C]
        n_r, mean_r, var_r = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]
        n = n_r.sum(0)
        mean = (n_r * mean_r).sum(0) / n
        m2 = (n_r * var_r).sum(0) + (n_r * (mean_r - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / n + eps)
        if running_mean is not None:
            unbiased = m2 / (n - 1).clamp_min(1)
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
        y = (self.stages.apply(x, mean, invstd, weight, bias, None) if count > 0
             else torch.empty_like(x))
        if counter is not None:  # the stages count nothing: count here (once they succeeded)
            counter.add_(1)
        return y, mean, invstd, None

    @torch.no_grad()
    def backward(self, dy, x, weight, bias, saved, needs):
        mean, invstd = saved[0], saved[1]
        C = x.shape[1]
        count = x.numel() // C
        if count > 0:
            sums = self.stages.bwd_reduce(dy, x, mean, invstd, weight, bias, None)
        else:
            sums = torch.zeros((2, C), device=x.device, dtype=mean.dtype)
        dw = (sums[1] * invstd).to(weight.dtype) if needs[1] and weight is not None else None
        db = sums[0].to(bias.dtype) if needs[2] and bias is not None else None
        dx = None
        if needs[0]:
            total = torch.cat([sums.reshape(-1), sums.new_full((1,), float(count))])
            dist.all_reduce(total, group=self.group)  # the sums and the count n, at once
            if count > 0:
                dx = self.stages.bwd_dx(dy, x, mean, invstd, weight, bias,
                                        total[:-1].view(2, C) / total[-1], None)
            else:
                dx = torch.zeros_like(x)
        return dx, dw, db


# ----------------------------------------------------------------------------- registered ops


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("bnkernels::sync_batch_norm",
                         mutates_args=("running_mean", "running_var", "counter"))
def sync_batch_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       counter: Optional[Tensor], momentum: float, eps: float,
                       activation: Optional[str], group: str, world: int, backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd): SyncBatchNorm's training forward over the process group named
    ``group``; mean and invstd are the merged statistics, for the backward."""
    stages = stage_plan(x, running_mean, running_var, weight, bias, activation, backend)
    plan = SyncPlan(stages, _group(group), world)
    y, mean, invstd, _ = plan.forward(x, weight, bias, Call(running_mean, running_var, plan,
                                                            momentum, eps, None, counter))
    return y, mean, invstd


sync_batch_norm_op.register_fake(forward_like)


@torch.library.custom_op("bnkernels::sync_batch_norm_backward", mutates_args=())
def sync_batch_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                                weight: Optional[Tensor], bias: Optional[Tensor],
                                activation: Optional[str], needs: List[bool], group: str,
                                world: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    stages = stage_plan(x, None, None, weight, bias, activation, backend)
    dx, dw, db = SyncPlan(stages, _group(group), world).backward(
        dy, x, weight, bias, Saved(mean, invstd, 0.0, None), tuple(needs))
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty, dw if dw is not None else empty,
            db if db is not None else empty)


@sync_batch_norm_backward_op.register_fake
def _(dy, x, mean, invstd, weight, bias, activation, needs, group, world, backend):
    return grads_like(x, weight, bias, needs)


class SyncOpPlan:
    """The traced route's :class:`SyncPlan`: the two registered ops."""

    op = "sync_batch_norm"
    training = True

    def __init__(self, activation, group: str, world: int, backend: str):
        self.activation, self.group, self.world, self.backend = activation, group, world, backend

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        running_mean, running_var, _, momentum, eps, _, counter = call
        y, mean, invstd = sync_batch_norm_op(x, weight, bias, running_mean, running_var,
                                             counter, momentum, eps, self.activation,
                                             self.group, self.world, self.backend)
        return y, mean, invstd, None

    def backward(self, dy, x, weight, bias, saved, needs):
        needs = [bool(n) for n in needs]
        dx, dw, db = sync_batch_norm_backward_op(dy, x, saved[0], saved[1], weight, bias,
                                                 self.activation, needs, self.group,
                                                 self.world, self.backend)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None)


SYNC_BATCH_NORM = register(Family(
    name="sync_batch_norm",
    plans={},  # its plan is made of a BatchNorm plan's stages (SyncPlan), on every backend
    running=("running_mean", "running_var"),
    saved=("mean", "invstd"),
    op_plan=SyncOpPlan,
    grads=None,
    label="SyncBatchNorm (across processes)",
    no_grads=("its statistics merge every process's batch, which a differentiable local "
              "recomputation cannot see"),
    instead=("Take second derivatives in one process (bnkernels.BatchNorm*d, or "
             "SyncBatchNorm outside a multi-process group)."),
    doc="BatchNorm over the batches of every process in a group",
    bench={},  # needs a process group: benchmarked as BatchNorm
))


# ----------------------------------------------------------------------------- the call


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, activation,
                    group, world: int, counter=None):
    """A SyncBatchNorm training call over ``group`` (``world`` > 1 processes): scalars checked
    by the caller, the input validated with its BatchNorm stage plan's signature."""
    if type(x) not in (Tensor, torch.nn.Parameter) or _is_compiling() or _dispatch_modes():
        _validate_batch_norm("SyncBatchNorm", x, running_mean, running_var, weight, bias, True,
                             momentum, eps, activation)
        name = backends.backend_name_for_compile("batch_norm", str(x.device),
                                                 str(x.dtype).replace("torch.", ""),
                                                 backends.GENERATION)
        plan = SyncOpPlan(activation, group.group_name, world, name)
    else:
        plan = SyncPlan(stage_plan(x, running_mean, running_var, weight, bias, activation),
                        group, world)
    return NormFunction.apply(x, weight, bias, Call(
        running_mean, running_var, plan, float(momentum), float(eps), None, counter))


__all__ = ["SYNC_BATCH_NORM", "SyncOpPlan", "SyncPlan", "sync_batch_norm",
           "sync_batch_norm_backward_op", "sync_batch_norm_op"]
