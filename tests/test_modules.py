"""Drop-in modules, convert(), torch.library ops, torch.compile and SyncBatchNorm.

The BatchNorm modules are checked on every sample input PyTorch itself uses to test
nn.BatchNorm1d/2d/3d (torch.testing._internal.common_modules.module_db): ours must match torch's
in training and then in eval (outputs, input and parameter gradients, every buffer), and their
state_dicts must load into each other with strict=True.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_close, make_inputs
from torch import nn

import bnkernels as bnk

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
BN_INFOS = [m for m in common_modules.module_db
            if m.name in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")]
OURS = {nn.BatchNorm1d: bnk.BatchNorm1d, nn.BatchNorm2d: bnk.BatchNorm2d,
        nn.BatchNorm3d: bnk.BatchNorm3d}


def _samples():
    for info in BN_INFOS:
        inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                         requires_grad=True, training=True)
        for i, mi in enumerate(inputs):
            yield pytest.param(info, i, id=f"{info.name}-{i}-{getattr(mi, 'desc', '')}")


def _grads_and_state(module, x, dy):
    y = module(x)
    y.backward(dy)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads, state


@pytest.mark.parametrize("info,index", list(_samples()))
def test_module_matches_torch_on_torch_samples(info, index, device):
    mi = info.module_inputs_func(info, device=device.type, dtype=torch.float32,
                                 requires_grad=True, training=True)[index]
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    x0 = mi.forward_input.args[0].detach()
    torch.manual_seed(0)
    ref = info.module_cls(*args, **kwargs).to(device)
    ours = OURS[info.module_cls](*args, **kwargs).to(device)
    assert isinstance(ours, info.module_cls)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for step, mode in enumerate(("train", "train", "eval")):
        ref.train(mode == "train")
        ours.train(mode == "train")
        x = (x0 * (1 + step) + step).to(device)
        dy = torch.randn_like(x)
        r = _grads_and_state(ref, x.clone().requires_grad_(), dy)
        o = _grads_and_state(ours, x.clone().requires_grad_(), dy)
        assert_close(o[0], r[0], torch.float32, f"{mode} output")
        assert_close(o[1], r[1], torch.float32, f"{mode} input grad")
        assert r[2].keys() == o[2].keys()
        for k in r[2]:
            assert_close(o[2][k], r[2][k], torch.float32, f"{mode} grad {k}")
        assert r[3].keys() == o[3].keys()
        for k in r[3]:
            if r[3][k].is_floating_point():
                assert_close(o[3][k], r[3][k], torch.float32, f"{mode} buffer {k}")
            else:
                assert torch.equal(o[3][k], r[3][k]), k
        for m in (ref, ours):
            m.zero_grad()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_batchnorm1d_takes_3d_input_and_rejects_4d():
    m = bnk.BatchNorm1d(4)
    ref = nn.BatchNorm1d(4)
    x = torch.randn(3, 4, 5)
    assert_close(m(x), ref(x), torch.float32, "3-D input")
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        m(torch.randn(3, 4, 5, 6))


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnk.BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum must be in"):
        bnk.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        bnk.BatchNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="p must be one of 1, 2, inf"):
        bnk.LpNorm2d(3, p=3)
    with pytest.raises(ValueError, match="seed must be an int"):
        bnk.NoisyBatchNorm2d(3, seed=-2)
    with pytest.raises(TypeError, match="noise must be a bnkernels.NoiseConfig"):
        bnk.NoisyBatchNorm2d(3, noise={"n_mu": 0.5})
    with pytest.raises(ValueError, match="input has 4 channels.*num_features=3"):
        bnk.BatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="input has 5 channels.*num_features=3"):
        bnk.LpNorm2d(3)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="expected 4D input"):
        bnk.LpNorm2d(3)(torch.randn(2, 3, 3))


def test_fused_relu_module_and_repr(device):
    torch.manual_seed(1)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(device)
    ours = bnk.BatchNorm2d(3, activation="relu").to(device)
    ours.load_state_dict(ref[0].state_dict())
    x = torch.randn(4, 3, 5, 5, device=device)
    assert_close(ours(x), ref(x), torch.float32, "y")
    assert "activation='relu'" in repr(ours)


# ----------------------------------------------------------------------------- noisy and l_p


def test_noisy_module_steps_and_resumes(device):
    """The step buffer advances per training forward; a checkpoint resumes the same noise."""
    torch.manual_seed(0)
    m = bnk.NoisyBatchNorm2d(3, seed=5).to(device)
    x = torch.randn(4, 3, 5, 5, device=device)
    y0 = m(x)
    assert int(m.noise_step) == 1
    ckpt = {k: v.clone() for k, v in m.state_dict().items()}
    y1 = m(x)
    assert int(m.noise_step) == 2 and not torch.equal(y0, y1)
    resumed = bnk.NoisyBatchNorm2d(3, seed=5).to(device)
    resumed.load_state_dict(ckpt, strict=True)
    assert torch.equal(resumed(x), y1)
    # Each forward equals the functional op at that step.
    expect = bnk.noisy_batch_norm(x, None, None, m.weight, m.bias, True, seed=5, step=2)
    assert torch.equal(m(x), expect)
    m.eval()
    plain = bnk.BatchNorm2d(3).to(device)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "noise_step"})
    plain.eval()
    # No random noise in eval: its expectation, E[s] a + E[m] = 1.125 a, deterministic.
    assert torch.allclose(m(x), 1.125 * plain(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(m(x), m(x))
    assert int(m.noise_step) == 3


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_module_matches_functional(p, device):
    torch.manual_seed(0)
    m = bnk.LpNorm2d(3, p=p, momentum=None).to(device)
    x = torch.randn(4, 3, 5, 5, device=device) + 0.3
    rm, rs = torch.zeros(3, device=device), torch.ones(3, device=device)
    for _ in range(2):
        y = m(x)
    from bnkernels.functional import lp_norm

    lp_norm(x, p, rm, rs, training=True, momentum=1.0)
    lp_norm(x, p, rm, rs, training=True, momentum=0.5)  # the cumulative average of 2 batches
    assert_close(y, lp_norm(x, p, None, None, training=True), torch.float32, "y")
    assert_close(m.running_mean, rm, torch.float32, "running_mean")
    assert_close(m.running_scale, rs, torch.float32, "running_scale")
    m.eval()
    assert_close(m(x), lp_norm(x, p, rm, rs, training=False), torch.float32, "eval y")


# ----------------------------------------------------------------------------- convert


def _resnet_like():
    """A torchvision-style block (conv-bn-relu, downsample Sequential with a BatchNorm)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.downsample = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.BatchNorm1d(5))

        def forward(self, x):
            return self.head(self.relu(self.bn1(self.conv1(x))) + self.downsample(x))

    return Block()


def test_convert_round_trip_keeps_weights_and_statistics(device):
    torch.manual_seed(0)
    model = _resnet_like().to(device)
    x = torch.randn(6, 3, 4, 4, device=device)
    model(x)  # some running statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.eval()
    ref_out = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = bnk.convert(model, to="batchnorm")
    assert isinstance(ours.bn1, bnk.BatchNorm2d) and isinstance(ours.head[2], bnk.BatchNorm1d)
    assert isinstance(ours.downsample[1], bnk.BatchNorm2d) and not ours.bn1.training
    assert_close(ours(x), ref_out, torch.float32, "converted eval output")
    back = bnk.convert(ours, to="torch")
    assert type(back.bn1) is nn.BatchNorm2d and type(back.head[2]) is nn.BatchNorm1d
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k]), k
    none = bnk.convert(back, to="none")
    assert isinstance(none.bn1, nn.Identity) and isinstance(none.head[2], nn.Identity)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in none.modules())


@pytest.mark.parametrize("to,cls", [("noisy", bnk.NoisyBatchNorm2d), ("l1", bnk.LpNorm2d),
                                    ("l2", bnk.LpNorm2d), ("linf", bnk.LpNorm2d)])
def test_convert_to_noisy_and_lp_trains(to, cls, device):
    torch.manual_seed(0)
    model = bnk.convert(_resnet_like().to(device), to=to)
    assert isinstance(model.bn1, cls)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 4, 4, device=device), torch.randint(0, 5, (8,), device=device)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_convert_l2_maps_running_variance():
    bn = nn.BatchNorm2d(3)
    bn.running_var.copy_(torch.tensor([4.0, 9.0, 1.0]))
    bn.running_mean.copy_(torch.tensor([1.0, 0.0, 2.0]))
    lp = bnk.convert(bn, to="l2", centered=True)
    assert torch.allclose(lp.running_scale, torch.tensor([2.0, 3.0, 1.0]))
    lp = bnk.convert(bn, to="l2")
    assert torch.allclose(lp.running_scale, torch.tensor([5.0, 9.0, 5.0]).sqrt())


def test_convert_errors():
    with pytest.raises(ValueError, match="unknown target 'layernorm'"):
        bnk.convert(nn.BatchNorm2d(3), to="layernorm")
    with pytest.raises(NotImplementedError, match="sync=True is only for"):
        bnk.convert(nn.BatchNorm2d(3), to="noisy", sync=True)


def test_convert_sync():
    model = bnk.convert(_resnet_like(), to="batchnorm", sync=True)
    assert isinstance(model.bn1, bnk.SyncBatchNorm) and isinstance(model.bn1, nn.SyncBatchNorm)
    back = bnk.convert(model, to="batchnorm")  # SyncBatchNorm -> BatchNorm2d (dim=2 default)
    assert type(back.bn1) is bnk.BatchNorm2d


# ----------------------------------------------------------------------------- training parity


def _cnn(bn):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), bn(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), bn(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def test_small_cnn_trains_like_torch_for_20_steps(device):
    torch.manual_seed(0)
    ref = _cnn(nn.BatchNorm2d).to(device)
    ours = bnk.convert(_cnn(nn.BatchNorm2d).to(device), to="batchnorm")
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=g).to(device)
    y = torch.randint(0, 3, (8,), generator=g).to(device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    for _ in range(20):
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, k, scale=None)


# ----------------------------------------------------------------------------- torch.library


def _op_samples(device):
    inp = make_inputs(Case((4, 3, 5, 6), True), device)
    args = [inp["x"], inp["weight"], inp["bias"], inp["running_mean"], inp["running_var"]]
    counter = torch.zeros((), dtype=torch.long, device=device)  # a num_batches_tracked
    yield "bn-train", torch.ops.bnkernels.batch_norm.default, (
        *args, counter, True, 0.1, 1e-5, "relu", None, 0, 0, None)
    yield "bn-eval", torch.ops.bnkernels.batch_norm.default, (
        *args, None, False, 0.1, 1e-5, None, None, 0, 0, None)
    yield "noisy", torch.ops.bnkernels.batch_norm.default, (
        *args, None, True, 0.1, 1e-5, None, [0.5, 1.25, 0.1, 0.1], 3, 0,
        torch.tensor(4, device=device))
    yield "noisy-bwd", torch.ops.bnkernels.batch_norm_backward.default, (
        torch.randn_like(inp["x"]), inp["x"], torch.randn(3, device=device),
        torch.rand(3, device=device) + 0.5, inp["weight"], None, True, None,
        [True, True, False], [0.5, 1.25, 0.1, 0.1], 3, 0, torch.tensor(4, device=device))
    dy = torch.randn_like(inp["x"])
    mean, invstd = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    yield "bn-bwd", torch.ops.bnkernels.batch_norm_backward.default, (
        dy, inp["x"], mean, invstd, inp["weight"], inp["bias"], True, "relu",
        [True, True, True], None, 0, 0, None)
    for p in (1.0, 2.0, math.inf):
        yield f"lp{p}", torch.ops.bnkernels.lp_norm.default, (
            *args, counter, p, True, 0.1, 1e-5, False)
    yield "lp-eval", torch.ops.bnkernels.lp_norm.default, (*args, None, 1.0, False, 0.1, 1e-5,
                                                           True)
    yield "lp-bwd", torch.ops.bnkernels.lp_norm_backward.default, (
        dy, inp["x"], mean, invstd, inp["weight"], inp["bias"], 2.0, True, True, 1e-5,
        [True, True, True])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend, device):
    for _name, op, args in _op_samples(device):
        torch.library.opcheck(op, (*args, backend))


@pytest.mark.parametrize("norm", ["batchnorm", "noisy", "l2"])
def test_torch_compile_fullgraph_matches_eager(norm, device):
    torch.manual_seed(0)
    eager = bnk.convert(_cnn(nn.BatchNorm2d).to(device), to=norm)
    compiled_model = bnk.convert(_cnn(nn.BatchNorm2d).to(device), to=norm)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager"
                             if device.type == "cpu" else "inductor")
    x = torch.randn(4, 3, 6, 6, device=device)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        assert_close(yc, ye, torch.float32, "output")
        ye.square().sum().backward()
        yc.square().sum().backward()
    for (k, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        assert_close(a.grad, b.grad, torch.float32, f"grad {k}")
    for (k, a), (_, b) in zip(compiled_model.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_of_a_training_step():
    torch.manual_seed(0)
    model = bnk.convert(_cnn(nn.BatchNorm2d).cuda(), to="noisy")
    ref = bnk.convert(_cnn(nn.BatchNorm2d).cuda(), to="noisy")
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(8, 3, 6, 6, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (kernels compiled, allocator primed)
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(s)
    ref.load_state_dict(model.state_dict())
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
    for _ in range(3):
        graph.replay()
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
    torch.cuda.synchronize()
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, k)
        else:
            assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- SyncBatchNorm


def _sync_worker(rank, world, init_file, result_file, backend):
    import torch.distributed as dist

    os.environ["BNKERNELS_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 5, 4, generator=g) * 2 + 1
        dy = torch.randn(8, 3, 5, 4, generator=g)
        sizes = [3, 5]  # unequal per-rank batches
        start = sum(sizes[:rank])
        xs = x[start:start + sizes[rank]].clone().requires_grad_()
        m = bnk.SyncBatchNorm(3, momentum=0.3, activation="relu")
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        y = m(xs)
        y.backward(dy[start:start + sizes[rank]])
        # all_gather needs equal sizes: pad each rank's slice to the largest.
        padded_y = torch.zeros(max(sizes), 3, 5, 4)
        padded_y[: sizes[rank]] = y.detach()
        padded_dx = torch.zeros(max(sizes), 3, 5, 4)
        padded_dx[: sizes[rank]] = xs.grad
        gy = [torch.zeros_like(padded_y) for _ in range(world)]
        gdx = [torch.zeros_like(padded_dx) for _ in range(world)]
        dist.all_gather(gy, padded_y)
        dist.all_gather(gdx, padded_dx)
        ys = [gy[r][: sizes[r]] for r in range(world)]
        dxs = [gdx[r][: sizes[r]] for r in range(world)]
        dw, db = m.weight.grad.clone(), m.bias.grad.clone()
        dist.all_reduce(dw)
        dist.all_reduce(db)
        if rank == 0:
            torch.save(dict(y=torch.cat(ys), dx=torch.cat(dxs), dw=dw, db=db,
                            running_mean=m.running_mean, running_var=m.running_var,
                            x=x, dy=dy), result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sync_batch_norm_two_gloo_processes_equal_one_big_batch(backend, tmp_path):
    import torch.multiprocessing as mp

    if backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the workers
    result = tmp_path / "result.pt"
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(result), backend), nprocs=2,
             join=True)
    r = torch.load(result)
    x = r["x"].double().requires_grad_()
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5))
    y.backward(r["dy"].double())
    assert_close(r["y"], y, torch.float32, "y")
    assert_close(r["dx"], x.grad, torch.float32, "dx")
    assert_close(r["dw"], w.grad, torch.float32, "dweight (summed over ranks)")
    assert_close(r["db"], b.grad, torch.float32, "dbias (summed over ranks)")
    assert_close(r["running_mean"], rm, torch.float32, "running_mean")
    assert_close(r["running_var"], rv, torch.float32, "running_var")


def test_sync_batch_norm_single_process_is_batch_norm():
    torch.manual_seed(0)
    m, ref = bnk.SyncBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    assert_close(m(x), ref(x), torch.float32, "y")
    assert_close(m.running_var, ref.running_var, torch.float32, "running_var")


def test_demo_runs_and_matches(capsys):
    from bnkernels.demo import run_demo

    assert run_demo(steps=2) == 0
    assert "MATCH" in capsys.readouterr().out
