"""The direct launch path agrees with Triton's JIT launch (see tests/triton_launch_check.py),
and launches are stubbed exactly (the host-path measurements rely on it)."""

import pytest
import torch
from helpers import run_compiler_script

triton = pytest.importorskip("triton")


@pytest.mark.skipif(not hasattr(triton, "knobs"),
                    reason="Triton < 3.3 has no direct launch path (every launch is the JIT's)")
def test_direct_launch_matches_the_jit_launch():
    """Under a fake driver that asserts, at every launch, what a GPU would refuse or fault on
    (pointer alignment vs the specialization, one device for function, stream, current
    context and tensors, a loaded module, the kernel's signature, grid limits): the direct
    launches agree with the JIT's, on fixed cases and on the fuzz harness's draws with every
    tensor argument at an odd offset and with the tensors on a device that is not current."""
    out = run_compiler_script("triton_launch_check.py")
    compared, checked = map(int, out.split("ok ")[-1].split())
    assert compared >= 100 and checked >= 100, out


def test_stubbed_launches_run_no_kernel(device):
    """Inside stub_launches no kernel runs (the running statistics, which only the kernels
    update, stay as they are); after it, the same plan launches again and computes BatchNorm."""
    import bnkernels as bnk
    from bnkernels.backends.triton.launch import stub_launches

    bnk.set_backend("triton")
    x = torch.randn(4, 3, 5, device=device) * 2 + 1
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    ref = torch.nn.functional.batch_norm(x, ref_rm, ref_rv, training=True)
    torch.testing.assert_close(bnk.batch_norm(x, rm, rv, training=True), ref)
    torch.testing.assert_close(rm, ref_rm)
    with stub_launches():
        for _ in range(2):
            bnk.batch_norm(x, rm, rv, training=True)
    torch.testing.assert_close(rm, ref_rm)  # untouched: no kernel ran
    torch.testing.assert_close(rv, ref_rv)
    torch.nn.functional.batch_norm(x, ref_rm, ref_rv, training=True)
    torch.testing.assert_close(bnk.batch_norm(x, rm, rv, training=True), ref)
    torch.testing.assert_close(rm, ref_rm)  # the plan launches again


def test_split_workspaces_under_emulated_cuda_graphs():
    """The Triton split plans' workspaces under (emulated) graph capture: one per captured
    call, owned by its graph (not the eager one, not another graph's), kept through
    PLANS.clear(); interleaved replays, one after a ticket was left part-way, give the eager
    call's results bit for bit (see tests/cuda_emulator/graphs.py)."""
    import gc

    from cuda_emulator.graphs import EmulatedGraph

    from bnkernels.backends.plan import GRAPH_WORKSPACES, PLANS, Call, Saved, Signature
    from bnkernels.backends.triton.batch_norm.plan import BatchNormPlan
    from bnkernels.backends.triton.common import override_config

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    with override_config(strategy="split"):
        plan = BatchNormPlan(Signature.of("batch_norm", x, True))

        def call():
            y, mean, invstd, _ = plan.forward(x, None, None,
                                              Call(None, None, plan, 0.1, 1e-5, None, None))
            dx = plan.backward(dy, x, None, None, Saved(mean, invstd, 1e-5, None),
                               (True, False, False))[0]
            return y, dx

        eager = call()
        eager_ws = plan.workspaces.get()
        graphs = [EmulatedGraph([plan.workspaces], call) for _ in range(2)]
        for graph in graphs:
            graph.capture()
        owned = [ws for graph in graphs for ws in graph.made]
        assert len(owned) == 4 and len({id(w) for w in (*owned, eager_ws)}) == 5
        PLANS.clear()
        gc.collect()
        assert all(any(ws is held for held in GRAPH_WORKSPACES) for ws in owned)
        graphs[0].made[0].ticket.fill_(2)  # a ticket left part-way
        for graph in (*graphs, *graphs):
            out = graph.replay()
            assert all(torch.equal(o, e) for o, e in zip(out, eager))
    assert plan.workspaces.get() is eager_ws and int(eager_ws.ticket.abs().sum()) == 0
    torch.testing.assert_close(eager[0], torch.nn.functional.batch_norm(x, None, None,
                                                                        training=True))


def test_a_pointer_bound_as_a_tensor_may_come_as_none():
    """A launch binds its direct path on its first call; an optional tensor that was given
    then and is None on a later call (another compiled variant: Triton specializes on None)
    goes to the JIT, which launches that variant, instead of failing on None.data_ptr()."""
    from bnkernels.backends.triton import common
    from bnkernels.backends.triton.affine import affine_apply_kernel
    from bnkernels.backends.triton.launch import Launch, emulate_launches

    rows, cols = 6, 8  # "ncs": rows = N * C, C = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g)
    mean, scale = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    call = ("x_ptr", "y_ptr", "w_ptr", "b_ptr")
    consts = dict(res_ptr=None, mean_ptr=mean, lo_ptr=None, scale_ptr=scale, save_mean_ptr=None,
                  save_invstd_ptr=None, ROWS=rows, COLS=cols, C=3, eps=0.0, BLOCK_R=8,
                  BLOCK_K=8, CHAN_ON_ROWS=True, SCALE_FROM=0, RELU=False,
                  ACC=common.tl_dtype(torch.float32), INT64=False, ALIGN=1, COLS_ON_X=False)
    launch = Launch(affine_apply_kernel, (1, 1), 1, consts, call)
    chan = torch.arange(rows) % 3
    with emulate_launches():
        launch.run(x_ptr=x, y_ptr=torch.empty_like(x), w_ptr=w, b_ptr=b)  # binds: a no-op
        assert "try:" in launch.source
        y = torch.full_like(x, float("nan"))
        launch.run(x_ptr=x, y_ptr=y, w_ptr=None, b_ptr=b)  # the JIT's variant, computed
    want = (x - mean[chan, None]) * scale[chan, None] + b[chan, None]
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_a_noisy_plan_made_inside_a_graph_capture_asks_for_a_warm_up(monkeypatch):
    """A noisy Triton plan copies its NoiseConfig to the device when it is made; made while a
    CUDA graph is captured, that copy would fail or be replayed only, so it is a clear error
    (torch.cuda.graphs asks for a warm-up iteration before capture anyway)."""
    from bnkernels.backends.triton.noise import noise_tensor
    from bnkernels.noise import NoiseConfig

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before capturing"):
        noise_tensor(NoiseConfig(), torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    t = noise_tensor(NoiseConfig(0.5, 1.25, 0.1, 0.2), "cpu")
    assert t.dtype == torch.float32 and t.tolist() == [0.5, 1.25, 0.10000000149011612,
                                                       0.20000000298023224]
    # one per NoiseConfig and device, kept for the process (a captured graph keeps its
    # address after the plan is gone)
    assert noise_tensor(NoiseConfig(0.5, 1.25, 0.1, 0.2), torch.device("cpu")) is t
    assert noise_tensor(NoiseConfig(), "cpu") is not t
