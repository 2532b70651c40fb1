"""Data-parallel training under ``torchrun``: the process-group backend, the process group
and the DistributedDataParallel wrapper that lets bnkernels.SyncBatchNorm run on CPU (gloo)
processes."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import bnkernels as bnk

DIST_BACKENDS = ("auto", "nccl", "gloo")


class DistBackendError(ValueError):
    """No process-group backend fits the processes, GPUs and devices asked for."""


def choose_dist_backend(local_world_size: int, visible_gpus: int, requested: str = "auto",
                        device: str = "auto") -> tuple[str, str]:
    """(process-group backend, device type) for data-parallel training.

    ``local_world_size``: processes on this node; ``visible_gpus``: the GPUs they can see;
    ``requested``: "auto", "nccl" or "gloo"; ``device``: "auto", "cpu" or "cuda". NCCL needs a
    GPU of its own per process (two ranks on one GPU fail). gloo trains on the CPU: it cannot
    all_gather CUDA tensors, which SyncBatchNorm needs. "auto" takes NCCL when every process
    has its own GPU, else gloo on the CPU (with a warning when GPUs are there). Impossible
    combinations raise :class:`DistBackendError`, saying why."""
    if requested not in DIST_BACKENDS:
        raise DistBackendError(f"distributed backend must be one of {DIST_BACKENDS}, got "
                               f"{requested!r}")
    dev = device.split(":")[0]
    if dev not in ("auto", "cpu", "cuda"):
        raise DistBackendError(f"distributed training runs on 'cpu' or 'cuda', got {device!r}")
    enough = visible_gpus >= local_world_size
    why = (f"{local_world_size} processes on this node but {visible_gpus} visible GPU(s); "
           "NCCL needs one GPU per process")
    if requested == "nccl" or (dev == "cuda" and requested == "auto"):
        if dev == "cpu":
            raise DistBackendError("NCCL needs CUDA devices: use --dist-backend gloo with "
                                   "--device cpu")
        if not enough:
            raise DistBackendError(f"cannot train with NCCL on CUDA: {why}. Start at most "
                                   f"{visible_gpus} processes per node, or train on the CPU "
                                   "with --dist-backend gloo (or --device cpu)")
        return "nccl", "cuda"
    if requested == "gloo":
        if dev == "cuda":
            raise DistBackendError("gloo cannot all_gather CUDA tensors (SyncBatchNorm needs "
                                   "it): use --dist-backend nccl on CUDA, or gloo with "
                                   "--device cpu")
        return "gloo", "cpu"
    if dev == "cpu":
        return "gloo", "cpu"
    if visible_gpus > 0 and enough:
        return "nccl", "cuda"
    if visible_gpus > 0:
        warnings.warn(f"training on the CPU with gloo: {why}", stacklevel=3)
    return "gloo", "cpu"


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False
    device: str = "cpu"  # the device type the processes train on

    @classmethod
    def from_env(cls, backend: str = "auto", device: str = "auto") -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        name, dev = choose_dist_backend(local_world, gpus, backend, device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(name)
            owns = True
        return cls(dist.get_world_size(), dist.get_rank(),
                   int(os.environ.get("LOCAL_RANK", "0")), owns, dev)

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class _DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that lets bnkernels.SyncBatchNorm run on CPU (gloo) processes.

    torch's DDP refuses every nn.SyncBatchNorm in a CPU module, because torch's own is
    CUDA-only; bnkernels' subclass all-gathers with any backend, so only torch's is refused."""

    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, bnk.SyncBatchNorm)
               for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)

