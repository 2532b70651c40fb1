"""Data-parallel training with bnkernels' SyncBatchNorm under torchrun.

    torchrun --nproc-per-node 2 examples/ddp_syncbn.py             # CPU: gloo, 2 processes
    torchrun --nproc-per-node 8 examples/ddp_syncbn.py --device cuda   # one GPU each: NCCL

``bnk.convert(model, sync=True)`` turns every BatchNorm into ``bnk.SyncBatchNorm``: each
training step combines the batch statistics of all ranks, so N ranks of B samples normalize
exactly as one process with N*B samples would. The script checks that: after a few DDP steps,
rank 0 replays the same steps in one process on the whole batch with torch's own BatchNorm,
and compares the weights and running statistics.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bnkernels as bnk


class CpuFriendlyDDP(DDP):
    """torch's DDP refuses any ``nn.SyncBatchNorm`` in a CPU module (torch's own is CUDA-only).
    ``bnk.SyncBatchNorm`` all-gathers with any process-group backend, gloo included, so on
    the CPU only torch's is refused here. On GPUs plain ``DDP`` is all you need."""

    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, bnk.SyncBatchNorm)
               for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    p.add_argument("--batch", type=int, default=4, help="samples per rank")
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same weights and data on every rank
    ref = make_model().to(device)
    synced = bnk.convert(copy.deepcopy(ref), sync=True)  # BatchNorm2d -> bnk.SyncBatchNorm
    model = DDP(synced, device_ids=[device]) if cuda else CpuFriendlyDDP(synced)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(world * args.batch, 3, args.size, args.size, device=device),
             torch.randint(0, 10, (world * args.batch,), device=device))
            for _ in range(args.steps)]
    mine = slice(rank * args.batch, (rank + 1) * args.batch)
    for step, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()
        if rank == 0:
            print(f"step {step}: rank-0 loss {loss.item():.5f} ({world} ranks x {args.batch})")

    ok = torch.ones((), device=device)
    if rank == 0:  # the same steps on one process, the whole batch, torch's BatchNorm
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for x, y in data:
            ref_opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        got = model.module.state_dict()
        worst = max((got[k].double() - v.double()).abs().max().item()
                    for k, v in ref.state_dict().items() if v.is_floating_point())
        print(f"max |DDP + bnk.SyncBatchNorm - one process, whole batch| over the state: "
              f"{worst:.1e}")
        ok.fill_(float(worst < 1e-4))
    dist.broadcast(ok, 0)
    dist.destroy_process_group()
    return 0 if ok.item() == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
