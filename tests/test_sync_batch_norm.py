"""SyncBatchNorm on the route every op takes (NormFunction on a plan; under torch.compile the
registered ops ``bnkernels::sync_batch_norm`` and its backward): ``torch.compile(...,
fullgraph=True)`` traces it in 2 gloo processes and gives eager's numbers."""

import copy
import os

import pytest
import torch

import bnkernels as bnk


def _compile_worker(rank, world, init_file, backend):
    import torch.distributed as dist

    os.environ["BNKERNELS_BACKEND"] = backend
    bnk.set_backend(backend)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(3 + 2 * rank, 3, 4, 4, generator=g) * 2 + 1  # uneven batches
        dy = torch.randn(x.shape, generator=g)
        eager = bnk.SyncBatchNorm(3, momentum=0.3, activation="relu")
        with torch.no_grad():
            eager.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            eager.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        compiled_module = copy.deepcopy(eager)
        compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
        outs = []
        for m, f in ((eager, eager), (compiled_module, compiled)):
            xs = x.clone().requires_grad_()
            y = f(xs)
            y.backward(dy)
            outs.append(dict(y=y.detach(), dx=xs.grad, dw=m.weight.grad, db=m.bias.grad,
                             rm=m.running_mean, rv=m.running_var, n=m.num_batches_tracked))
        for k in outs[0]:
            torch.testing.assert_close(outs[1][k], outs[0][k], rtol=0, atol=0, msg=k)
        assert int(outs[0]["n"]) == 1
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference"])
def test_sync_batch_norm_compiles_fullgraph_in_two_gloo_processes(backend, tmp_path):
    import torch.multiprocessing as mp

    # A worker killed by a signal (seen once in a full CI run: SIGABRT, "terminate called
    # without an active exception", from gloo's teardown; not reproduced alone) is retried
    # once; a worker that raises (wrong numbers) fails at once.
    for attempt in range(2):
        try:
            mp.spawn(_compile_worker, args=(2, str(tmp_path / f"init{attempt}"), backend),
                     nprocs=2, join=True)
            return
        except mp.ProcessExitedException:
            if attempt:
                raise
