"""The research layer's library functions: ICS (Definition 2.1) against a hand computation,
landscape probes on a quadratic with known smoothness, models, data, activations; every
measurement leaves the model exactly as found."""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import tarfile

import pytest
import torch
from helpers import assert_close
from torch import nn

import bnkernels
from bnkernels.experiments import claims_landscape, data, ics, landscape, models, noisy, report
from bnkernels.experiments.activations import (
    ActivationSampler,
    activation_site,
    moment_changes,
    sample_activations,
)
from bnkernels.experiments.batch import place
from bnkernels.experiments.train import RunConfig, choose_dist_backend

needs_modules = pytest.mark.skipif(not hasattr(bnkernels, "LpNorm2d"),
                                   reason="modules issue pending")


@pytest.fixture(autouse=True)
def _reference_backend(_restore_backend):
    """The experiments run the eager reference backend on the CPU (conftest turns the Triton
    interpreter on for the kernel tests; it is far too slow for training), on one thread as
    the reproduce runs do (small ops; several OpenMP threads on a busy machine stall)."""
    bnkernels.set_backend("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(model: nn.Module) -> dict:
    """Everything a measurement could disturb: parameters, buffers, gradients, modes, RNG."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), f"{k} changed"
    for n, g in before["grads"].items():
        h = after["grads"][n]
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f"grad {n}"
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"])


def _tiny_vgg(norm: str) -> nn.Module:
    return models.build_model("vgg", norm, arch="vgg11", width=1 / 32, seed=0)


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- ICS


def _half_sse(out, y):
    return 0.5 * (out - y).square().sum()


def test_ics_matches_hand_computation_on_3_layer_linear_net():
    """f(x) = W3 W2 W1 x, L = 1/2 sum ||f(x) - y||^2. With R = W3 W2 W1 X - Y (columns are
    samples): G1 = (W3 W2)^T R X^T, G2 = W3^T R (W1 X)^T, G3 = R (W2 W1 X)^T. G'_i is the same
    formula after W_j <- W_j - lr G_j for j < i."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False),
                        nn.Linear(3, 2, bias=False)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    lr = 0.05
    W1, W2, W3 = (m.weight.detach().clone() for m in net)
    X, Y = x.T, y.T

    def grads(W1, W2, W3):
        R = W3 @ W2 @ W1 @ X - Y
        return (W3 @ W2).T @ R @ X.T, W3.T @ R @ (W1 @ X).T, R @ (W2 @ W1 @ X).T

    G1, G2, G3 = grads(W1, W2, W3)
    W1n, W2n = W1 - lr * G1, W2 - lr * G2
    Gp = {1: G1, 2: grads(W1n, W2, W3)[1], 3: grads(W1n, W2n, W3)[2]}
    G = {1: G1, 2: G2, 3: G3}

    before = _state(net)
    got = ics.internal_covariate_shift(net, _half_sse, x, y, lr)
    _assert_same_state(before, _state(net))
    assert [r["layer"] for r in got] == [1, 2, 3]
    assert set(got[0]) == {"layer", "l2", "cosine"}
    for r in got:
        g, gp = G[r["layer"]].flatten(), Gp[r["layer"]].flatten()
        l2 = float((g - gp).norm())
        cos = float(g @ gp / (g.norm() * gp.norm()))
        assert r["l2"] == pytest.approx(l2, rel=1e-9, abs=1e-12)
        assert r["cosine"] == pytest.approx(cos, rel=1e-9)
    # Layer 1 has no preceding layers: G' = G. Deeper layers really shift here.
    assert got[0]["l2"] == 0 and got[0]["cosine"] == pytest.approx(1.0)
    assert got[2]["l2"] > 1e-3
    # A subset gives the same numbers for those layers.
    sub = ics.internal_covariate_shift(net, _half_sse, x, y, lr, layers=[3])
    assert sub == [got[2]]
    with pytest.raises(ValueError, match="out of range"):
        ics.internal_covariate_shift(net, _half_sse, x, y, lr, layers=[4])


def test_ics_updates_the_normalization_with_its_layer():
    """Linear -> BatchNorm -> Linear: layer 1 is the first Linear with the BatchNorm's gamma and
    beta, so G'_2 is taken after all three have stepped (checked against plain autograd)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), bnkernels.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    lr = 0.1
    ref = copy.deepcopy(net)
    loss = _half_sse(ref(x), y)
    block1 = [ref[0].weight, ref[0].bias, ref[1].weight, ref[1].bias]
    grads = torch.autograd.grad(loss, block1 + [ref[2].weight, ref[2].bias])
    G = torch.cat([g.flatten() for g in grads[4:]])
    ref.load_state_dict(net.state_dict())  # running statistics as found
    with torch.no_grad():
        for p, g in zip(block1, grads[:4]):
            p.sub_(lr * g)
    Gp = torch.cat([g.flatten() for g in torch.autograd.grad(
        _half_sse(ref(x), y), [ref[2].weight, ref[2].bias])])
    before = _state(net)
    (r,) = ics.internal_covariate_shift(net, _half_sse, x, y, lr, layers=[2])
    _assert_same_state(before, _state(net))
    assert r["l2"] == pytest.approx(float((G - Gp).norm()), rel=1e-9)
    assert r["cosine"] == pytest.approx(float(G @ Gp / (G.norm() * Gp.norm())), rel=1e-9)


@pytest.mark.parametrize("norm", ["none", "batchnorm",
                                  pytest.param("noisy", marks=needs_modules),
                                  pytest.param("l1", marks=needs_modules)])
def test_measurements_leave_the_model_as_found(norm):
    model = _tiny_vgg(norm)
    x, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()  # some gradients to keep, buffers already moved once
    before = _state(model)
    ics.internal_covariate_shift(model, loss_fn, x, y, 0.1, layers=[2, 5])
    _assert_same_state(before, _state(model))
    landscape.probe(model, loss_fn, x, y, [0.05, 0.4])
    landscape.probe(model, loss_fn, x, y, [0.1], direction="random", seed=3)
    _assert_same_state(before, _state(model))
    landscape.hessian_top_eigenvalue(model, loss_fn, x, y, iters=2)
    landscape.hessian_trace(model, loss_fn, x, y, samples=1)
    _assert_same_state(before, _state(model))
    sample_activations(model, x, [1, 3])
    _assert_same_state(before, _state(model))
    model.eval()
    before = _state(model)
    ics.internal_covariate_shift(model, loss_fn, x, y, 0.1, layers=[3])
    landscape.probe(model, loss_fn, x, y, [0.1])
    _assert_same_state(before, _state(model))


@needs_modules
def test_ics_sees_the_same_noise_in_g_and_g_prime():
    """For layer 1 nothing precedes it, and with noisy BatchNorm every forward must reuse the
    step's noise; a re-measurement gives bit-identical numbers."""
    model = _tiny_vgg("noisy")
    x, y = _batch()
    a = ics.internal_covariate_shift(model, nn.CrossEntropyLoss(), x, y, 0.1, layers=[1, 4])
    b = ics.internal_covariate_shift(model, nn.CrossEntropyLoss(), x, y, 0.1, layers=[1, 4])
    assert a == b and a[0]["l2"] == 0.0


# ----------------------------------------------------------------------------- landscape


def _quadratic(n=12, d=5, seed=0):
    """L(w) = 1/2 sum_i (x_i . w - y_i)^2: gradient X^T (X w - y), Hessian H = X^T X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return model, X, y


def test_probe_on_a_quadratic_matches_the_exact_values():
    model, X, y = _quadratic()
    w = model.weight.detach().flatten().clone()
    H = X.T @ X
    r = X @ w - y.flatten()
    g = X.T @ r
    L0 = 0.5 * float(r @ r)
    etas = [1e-3, 1e-2, 5e-2]
    before = _state(model)
    out = landscape.probe(model, _half_sse, X, y, etas)
    _assert_same_state(before, _state(model))
    # Along -g: L(w - eta g) = L - eta |g|^2 + eta^2/2 g^T H g, and the gradient moves by
    # -eta H g, so beta = |H g| / |g| for every eta.
    losses = [L0 - e * float(g @ g) + 0.5 * e * e * float(g @ H @ g) for e in etas]
    diffs = [e * float((H @ g).norm()) for e in etas]
    beta = float((H @ g).norm() / g.norm())
    assert out["loss"] == pytest.approx(L0, rel=1e-12)
    assert out["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert out["losses"] == pytest.approx(losses, rel=1e-10)
    assert out["grad_diffs"] == pytest.approx(diffs, rel=1e-10)
    assert out["betas"] == pytest.approx([beta] * 3, rel=1e-10)
    assert out["beta_smoothness"] == pytest.approx(beta, rel=1e-10)
    assert out["loss_min"] == pytest.approx(min(losses), rel=1e-10)
    assert out["loss_max"] == pytest.approx(max(losses), rel=1e-10)
    assert out["grad_diff_min"] == pytest.approx(min(diffs), rel=1e-10)
    assert out["grad_diff_max"] == pytest.approx(max(diffs), rel=1e-10)
    eig = torch.linalg.eigvalsh(H)
    assert float(eig[0]) <= beta <= float(eig[-1])


def test_probe_along_an_eigenvector_gives_the_eigenvalue():
    """X diagonal gives H = diag(lam); with the residual on one coordinate, g is an
    eigenvector and the effective beta-smoothness is exactly its eigenvalue."""
    lam = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    X = torch.diag(lam.sqrt())
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    y = torch.zeros(3, 1, dtype=torch.float64)
    out = landscape.probe(model, _half_sse, X, y, [0.01, 0.1, 0.3])
    assert out["beta_smoothness"] == pytest.approx(2.0, rel=1e-12)


def test_probe_random_direction_is_bounded_by_the_spectrum():
    model, X, y = _quadratic(seed=2)
    eig = torch.linalg.eigvalsh(X.T @ X)
    out = landscape.probe(model, _half_sse, X, y, [1e-3, 1e-2], direction="random", seed=5)
    assert out["direction"] == "random"
    assert float(eig[0]) - 1e-9 <= out["beta_smoothness"] <= float(eig[-1]) + 1e-9
    assert out["betas"][0] == pytest.approx(out["betas"][1], rel=1e-9)  # H d is linear in eta
    again = landscape.probe(model, _half_sse, X, y, [1e-3, 1e-2], direction="random", seed=5)
    assert again == out
    with pytest.raises(ValueError):
        landscape.probe(model, _half_sse, X, y, [0.1], direction="sideways")
    with pytest.raises(ValueError):
        landscape.probe(model, _half_sse, X, y, [])


# ----------------------------------------------------------------------------- curvature


class _Point(nn.Module):
    """A model that is just its parameter w (the loss function sees w itself)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return self.w


def _quadratic_form(w, A):
    """L(w) = 1/2 w^T A w: gradient A w, Hessian A."""
    return 0.5 * w @ A @ w


def test_hessian_top_eigenvalue_of_quadratics_is_the_closed_form():
    model, X, y = _quadratic(n=12, d=5, seed=3)  # L = 1/2 ||X w - y||^2: H = X^T X
    before = _state(model)
    top = landscape.hessian_top_eigenvalue(model, _half_sse, X, y, iters=500, tol=1e-12)
    _assert_same_state(before, _state(model))
    assert top.value == pytest.approx(float(torch.linalg.eigvalsh(X.T @ X)[-1]), rel=1e-8)
    value, iterations, largest, smallest, converged = top
    assert 1 < iterations < 500 and value == top.value == largest and converged
    assert smallest == pytest.approx(float(torch.linalg.eigvalsh(X.T @ X)[0]), rel=1e-8)
    # An indefinite Hessian whose eigenvalue of largest magnitude is negative: returned
    # signed (|value| is the spectral norm), with both ends of the spectrum.
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))[0]
    A = q @ torch.diag(torch.tensor([-5.0, 1.0, 3.0], dtype=torch.float64)) @ q.T
    point = _Point(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    top = landscape.hessian_top_eigenvalue(point, _quadratic_form, None, A, iters=500,
                                           tol=1e-13)
    assert top.value == pytest.approx(-5.0, rel=1e-9)
    assert (top.smallest, top.largest) == (pytest.approx(-5.0), pytest.approx(3.0))
    with pytest.raises(ValueError):
        landscape.hessian_top_eigenvalue(point, _quadratic_form, None, A, iters=0)


def test_hessian_trace_is_exact_for_a_diagonal_hessian():
    """Rademacher v: v^T H v = sum_i H_ii v_i^2 = tr(H) exactly when H is diagonal."""
    lam = torch.tensor([0.5, 2.0, 7.0, -1.0], dtype=torch.float64)
    point = _Point(torch.ones(4, dtype=torch.float64))
    tr = landscape.hessian_trace(point, _quadratic_form, None, torch.diag(lam), samples=3)
    assert tr.value == pytest.approx(8.5, rel=1e-12) and tr.stderr == pytest.approx(0, abs=1e-9)


def _flat_hessian(net: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """The full Hessian of loss_fn(net(x), y) in net's parameters, by
    torch.autograd.functional.hessian on a functional_call (buffers as found, every call)."""
    from torch.func import functional_call

    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def f(flat):
        params, o = {}, 0
        for n, shape in zip(names, shapes):
            params[n] = flat[o:o + shape.numel()].view(shape)
            o += shape.numel()
        state = {**params, **{k: v.clone() for k, v in buffers.items()}}
        return loss_fn(functional_call(net, state, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def test_hessian_top_eigenvalue_matches_autograd_on_a_tiny_batchnorm_network():
    """bnkernels' BatchNorm (training mode) has a once-differentiable backward; the probe works
    on a twice-differentiable copy. Its value matches the top eigenvalue of the full Hessian
    of the same network with torch's own BatchNorm (bnk.convert(to="torch"))."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), bnkernels.BatchNorm1d(4), nn.Tanh(),
                        nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    before = _state(net)
    top = landscape.hessian_top_eigenvalue(net, _half_sse, x, y, iters=2000, tol=1e-12)
    _assert_same_state(before, _state(net))
    H = _flat_hessian(bnkernels.convert(copy.deepcopy(net), to="torch"), _half_sse, x, y)
    eig = torch.linalg.eigvalsh(H)
    dominant = eig[eig.abs().argmax()]
    assert float(dominant) < -abs(float(eig[-1]))  # negative curvature dominates here
    assert top.value == pytest.approx(float(dominant), rel=1e-6)


@pytest.mark.parametrize("norm", ["batchnorm", pytest.param("noisy", marks=needs_modules),
                                  pytest.param("l1", marks=needs_modules),
                                  pytest.param("linf", marks=needs_modules)])
@pytest.mark.parametrize("train_mode", [True, False])
def test_twice_differentiable_copy_computes_the_same_function(norm, train_mode):
    model = _tiny_vgg(norm).train(train_mode)
    x, y = _batch(4)
    twin = landscape.twice_differentiable_copy(model)
    loss_fn = nn.CrossEntropyLoss()
    a, b = loss_fn(model(x), y), loss_fn(twin(x), y)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    ga = torch.autograd.grad(a, list(model.parameters()))
    gb = torch.autograd.grad(b, list(twin.parameters()), create_graph=True)
    for (name, _), u, v in zip(model.named_parameters(), ga, gb):  # fp32 rounding of sums:
        assert_close(u, v, torch.float32, name)  # the project's fp32 tolerance, scaled
    sa, sb = model.state_dict(), twin.state_dict()  # running statistics, noise steps
    assert all(torch.allclose(sa[k].double(), sb[k].double(), rtol=1e-6, atol=1e-7)
               for k in sa)
    # and it is twice differentiable
    torch.autograd.grad(sum(g.square().sum() for g in gb), list(twin.parameters()))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch,convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13),
                                        ("vgg19", 16)])
def test_vgg_depths_and_width(arch, convs):
    model = models.VGG(arch, "batchnorm", width=0.125)
    layers = models.weight_layers(model)
    assert len(layers) == convs + 1 and isinstance(layers[-1], nn.Linear)
    assert [m.out_channels for m in layers[:-1]] == [
        round(v * 0.125) for v in models.VGG_CONFIGS[arch] if v != "M"]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == convs and all(isinstance(m, bnkernels.BatchNorm2d) for m in norms)
    # conv -> norm -> ReLU, and the activation of layer i is its norm's output
    assert activation_site(model, 1) is norms[0]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_standard_network_has_identity_norms():
    model = _tiny_vgg("none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(activation_site(model, 2), nn.Identity)


def test_make_norm_by_name():
    assert isinstance(models.make_norm("batchnorm", 4), bnkernels.BatchNorm2d)
    assert isinstance(models.make_norm("batchnorm", 4, dim=1), bnkernels.BatchNorm1d)
    assert isinstance(models.make_norm("none", 4), nn.Identity)
    assert type(models.make_norm("torch", 4)) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown normalization"):
        models.make_norm("group", 4)


@needs_modules
def test_make_norm_noisy_and_lp():
    noisy = models.make_norm("noisy", 4, seed=7)
    assert isinstance(noisy, bnkernels.NoisyBatchNorm2d) and noisy.seed == 7
    for name, p in (("l1", 1), ("l2", 2), ("linf", math.inf)):
        m = models.make_norm(name, 4, dim=1)
        assert isinstance(m, bnkernels.LpNorm1d) and m.p == p and not m.centered
    opts = models.NormOptions(centered=True)
    assert models.make_norm("l2", 3, options=opts).centered


def test_deep_linear_network_and_glorot_init():
    net = models.build_model("dln", "batchnorm", seed=0)
    linears = models.weight_layers(net)
    assert len(linears) == 25 and all(m.weight.shape == (10, 10) and m.bias is None
                                      for m in linears)
    norms = [m for m in net if isinstance(m, bnkernels.BatchNorm1d)]
    assert len(norms) == 24 and isinstance(net[-1], nn.Linear)  # none after the last layer
    w = torch.cat([m.weight.detach().flatten() for m in linears])
    bound = math.sqrt(6 / 20)  # Glorot uniform for 10 x 10
    assert float(w.abs().max()) <= bound
    assert float(w.var()) == pytest.approx(bound ** 2 / 3, rel=0.15)
    assert len([m for m in models.build_model("dln", "none") if isinstance(m, nn.Identity)]) == 24
    # the same seed gives the same network
    again = models.build_model("dln", "batchnorm", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 again.state_dict().values()))


# ----------------------------------------------------------------------------- data


def test_cifar10_loader_on_a_fixture(tmp_path):
    root = data.write_cifar10_fixture(tmp_path, per_batch=4, seed=3)
    ds = data.load_cifar10(tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.num_classes == 10
    raw_x, raw_y = [], []
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        with open(root / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        raw_x.append(torch.tensor(entry[b"data"], dtype=torch.float32).view(-1, 3, 32, 32) / 255)
        raw_y += entry[b"labels"]
    train = torch.cat(raw_x[:5])
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(ds.train_x, (train - mean) / std, atol=1e-5)
    assert torch.allclose(ds.test_x, (raw_x[5] - mean) / std, atol=1e-5)  # train statistics
    assert ds.train_y.tolist() + ds.test_y.tolist() == raw_y
    # the folder holding the batches works too
    assert torch.equal(data.load_cifar10(root).train_y, ds.train_y)


def test_cifar10_missing_gives_a_clear_error_and_no_download(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", no_network)
    with pytest.raises(FileNotFoundError, match="--download"):
        data.load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load_cifar10(None)


def test_cifar10_download_verifies_the_checksum(tmp_path):
    """The download path on a local file:// URL: extracted when the md5 matches, refused
    otherwise."""
    src = tmp_path / "src"
    data.write_cifar10_fixture(src, per_batch=2)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / data.CIFAR10_DIR, arcname=data.CIFAR10_DIR)
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    got = data.download_cifar10(dest, url=tarball.as_uri(), md5=md5)
    assert (got / "test_batch").is_file()
    assert data.load_cifar10(dest).train_x.shape == (10, 3, 32, 32)
    with pytest.raises(RuntimeError, match="md5"):
        data.download_cifar10(tmp_path / "other", url=tarball.as_uri(), md5="0" * 32)
    assert data.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_digits_and_gaussian_data():
    ds = data.load_digits()
    assert ds.train_x.shape[1:] == (3, 32, 32) and ds.num_classes == 10
    assert ds.num_train + len(ds.test_y) == 1797 and len(ds.test_y) == 359
    assert set(ds.train_y.tolist()) == set(range(10))
    dln = data.make_dln_data()
    assert dln.train_x.shape == (1000, 10) and dln.num_classes is None
    A = torch.linalg.lstsq(dln.train_x, dln.train_y).solution
    assert float((dln.train_x @ A - dln.train_y).abs().max()) < 1e-4  # targets are A x


def test_batches_are_a_function_of_seed_and_step():
    a = [data.batch_indices(50, 16, s, seed=1) for s in range(6)]
    b = [data.batch_indices(50, 16, s, seed=1) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    epoch = torch.cat(a[:3])
    assert len(set(epoch.tolist())) == 48  # 3 batches per epoch, without repeats
    assert not torch.equal(a[0], a[3])  # a new permutation each epoch
    assert torch.equal(data.batch_indices(50, 100, 7, seed=0), torch.arange(50))  # full batch


# ----------------------------------------------------------------------------- activations


def test_activation_sampler_and_moment_changes():
    model = _tiny_vgg("batchnorm")
    sampler = ActivationSampler(model, [1, 3], units=2, seed=0)
    x, _ = _batch()
    model(x)
    assert sampler.collect() == []  # not armed
    sampler.armed = True
    out = {}
    hook = activation_site(model, 1).register_forward_hook(lambda m, a, o: out.update(y=o))
    model(x)
    hook.remove()
    recs = sampler.collect()
    sampler.remove()
    assert [r["layer"] for r in recs] == [1, 3]
    u = recs[0]["units"]
    vals = out["y"][:, u].transpose(0, 1).reshape(len(u), -1).double()
    assert recs[0]["mean"] == pytest.approx(vals.mean(1).tolist(), abs=1e-9)
    assert recs[0]["var"] == pytest.approx(vals.var(1, unbiased=False).tolist(), rel=1e-6)
    # BatchNorm's output over the batch has mean beta = 0 and variance ~1
    assert max(abs(m) for m in recs[0]["mean"]) < 1e-5
    records = [{"step": 4, "layer": 1, "units": [0], "mean": [1.0], "var": [2.0]},
               {"step": 5, "layer": 1, "units": [0], "mean": [0.5], "var": [2.5]},
               {"step": 9, "layer": 1, "units": [0], "mean": [0.0], "var": [1.0]}]
    assert moment_changes(records) == [{"step": 4, "layer": 1, "d_mean": [0.5], "d_var": [0.5]}]


# ----------------------------------------------------------------------------- noisy BN eval


def _noisy_layer_at_batch_statistics(x: torch.Tensor) -> nn.Module:
    """A NoisyBatchNorm2d whose running statistics are x's batch statistics (biased variance,
    as training normalizes) and whose momentum is 0: eval and training normalize x alike."""
    layer = bnkernels.NoisyBatchNorm2d(x.shape[1], momentum=0.0, seed=3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        layer.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return layer


@needs_modules
def test_noisy_eval_mode_is_the_expectation_of_training_mode():
    """Eval mode gives what training mode gives on average over the noise (with the
    statistics the same): E[s a + m] = E[s] a + E[m] = 1.125 a at the paper's constants. When
    it gave a, a network's later layers, whose running statistics were gathered under the
    noise, saw inputs ~1.125x too small per noisy layer in eval (the quick VGG's test accuracy
    fell from ~99% to ~20%)."""
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    layer = _noisy_layer_at_batch_statistics(x)
    es, em = noisy.expected_noise(layer.noise)
    with torch.no_grad():
        a = bnkernels.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                 layer.bias, False, 0.0, layer.eps)
        mean_train = sum(layer.train()(x) for _ in range(200)) / 200  # 200 noise draws
        got = layer.eval()(x)
    assert torch.allclose(mean_train, es * a + em, atol=0.08)  # the expectation, sampled
    assert torch.allclose(got, es * a + em, rtol=1e-5, atol=1e-6)


@needs_modules
def test_noisy_diagnostics_apply_the_expected_noise_and_recalibrate():
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    layer = _noisy_layer_at_batch_statistics(x)
    model = nn.Sequential(layer)
    es, _ = noisy.expected_noise(layer.noise)
    assert es == pytest.approx(1.125)
    # The layers' own eval mode applies the expectation: the diagnostic leaves them as they are.
    assert not noisy.eval_drops_noise_mean(layer)
    with torch.no_grad():
        plain = model.eval()(x)
        assert torch.equal(noisy.with_expected_noise(model).eval()(x), plain)
        # recalibration: clean statistics, cumulative over the batches (here: one, x itself)
        twin = noisy.recalibrated(model, x, "cpu", batch_size=8)
    norm = twin[0]
    assert type(norm) is bnkernels.BatchNorm2d and not norm.training
    assert torch.allclose(norm.running_mean, x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(norm.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-6)
    # the running variance of the layers after the first, relative to clean statistics
    deep = nn.Sequential(layer, bnkernels.NoisyBatchNorm2d(3, seed=4))
    clean = noisy.recalibrated(deep, x, "cpu")
    with torch.no_grad():
        deep[1].running_var.copy_(2.0 * clean[1].running_var)
    assert noisy.running_var_ratio(deep, clean) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- plumbing


def test_choose_dist_backend():
    """NCCL only with a GPU per process; otherwise gloo on the CPU, or a clear error when the
    caller insisted on CUDA / NCCL."""
    f = choose_dist_backend
    assert f(2, 0) == ("gloo", "cpu")
    assert f(2, 2) == ("nccl", "cuda") and f(1, 8) == ("nccl", "cuda")
    with pytest.warns(UserWarning, match="2 processes on this node but 1 visible GPU"):
        assert f(2, 1) == ("gloo", "cpu")  # the one-GPU machine that killed rank 1
    assert f(2, 1, "gloo") == ("gloo", "cpu") and f(2, 4, "auto", "cpu") == ("gloo", "cpu")
    assert f(2, 2, "nccl", "cuda:0") == ("nccl", "cuda")
    for args, msg in [((2, 1, "nccl"), "1 visible GPU"), ((2, 1, "auto", "cuda"), "one GPU per"),
                      ((2, 2, "nccl", "cpu"), "NCCL needs CUDA"),
                      ((2, 2, "gloo", "cuda"), "gloo cannot all_gather"),
                      ((2, 2, "mpi"), "must be one of")]:
        with pytest.raises(ValueError, match=msg):
            f(*args)


def test_runs_are_placed_where_they_are_fast():
    vgg, dln = RunConfig(), RunConfig(model="dln", dataset="gaussian", loss="sum_squared")
    assert place(dln, "cuda") == "cpu" and place(vgg, "cuda") == "cuda"
    assert place(vgg, "cpu") == "cpu" and place(dln, "cuda", dln_device="same") == "cuda"
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert place(vgg) == auto and place(dln) == "cpu"


def test_claim_verdicts_over_seeds():
    v = report.verdict
    assert [v(k, 3) for k in range(4)] == ["not held", "not held", "held", "held"]
    assert [v(k, 5) for k in range(6)] == ["not held", "not held", "mixed", "mixed", "held",
                                           "held"]
    assert v(1, 2) == "mixed" and v(0, 0) == "not measured" and v(1, 1) == "held"
    per_seed = [(s, report.Measured("standard $std, BN $bn", {"std": a, "bn": b}, b > a,
                                    {"std": "pct"}))
                for s, (a, b) in enumerate([(0.5, 0.7), (0.6, 0.4), (0.2, 0.9)])]
    per_seed.append((3, report.Measured("runs missing")))
    row = report.aggregate(per_seed)
    assert row["measured"] == "standard 50.0% [20.0%, 60.0%], BN 0.7 [0.4, 0.9]"
    assert (row["held"], row["held_in"], row["measured_in"], row["seeds"]) == ("held", 2, 3, 4)
    assert [p["held"] for p in row["per_seed"]] == ["held", "not held", "held", "not measured"]
    assert row["per_seed"][1]["measured"] == "standard 60.0%, BN 0.4"


def test_suites_over_seeds():
    """The full mode: the paper's setups, five seeds; the gpu mode: VGG-16 at full width with
    the paper's optimizer, learning rates and batch; every run once per seed, the DLN's data
    seeded with the run."""
    full = report.suite_runs(report.SUITES["full"])
    assert len(full) == 15 * 5
    assert {c.seed for c in full.values()} == {0, 1, 2, 3, 4}
    vgg = full["vgg-batchnorm-lr0.1-seed3"]
    assert (vgg.arch, vgg.width, vgg.dataset, vgg.steps, vgg.batch_size, vgg.lr,
            vgg.momentum, vgg.weight_decay) == ("vgg16", 1.0, "cifar10", 15_000, 128, 0.1, 0, 0)
    assert full["dln-l1-lr1e-06-seed4"].steps == 10_000
    assert full["vgg-none-lr0.5-seed0"].hessian_every == 0  # curvature: base lr only
    gpu = report.suite_runs(report.SUITES["gpu"])
    assert len(gpu) == 15 * 3
    g = gpu["vgg-none-lr0.1-seed2"]
    assert (g.arch, g.width, g.batch_size, g.steps) == ("vgg16", 1.0, 128, report.GPU_STEPS)
    assert gpu["vgg-linf-lr0.1-seed0"].hessian_every > 0
    quick = report.suite_runs(report.SUITES["quick"])
    assert quick["dln-batchnorm-lr1e-07-seed1"].steps == 500
    assert quick["dln-batchnorm-lr1e-07-seed1"].ics_every == 25
    assert quick["dln-l1-lr1e-06-seed0"].landscape_every == 50
    q = quick["vgg-none-lr0.05-seed2"]  # the quick VGG's base lr (see CONFIGS["vgg-quick"])
    assert (q.arch, q.lr, q.steps) == ("vgg11", 0.05, 300)
    # the paper's probe grid, [1/2, 4] x lr
    assert q.landscape_steps == tuple(f * q.lr for f in (0.5, 1, 2, 4))
    high = quick["vgg-batchnorm-lr0.5-seed0"]  # the paper's high lr: accuracy only
    assert (high.steps, high.landscape_every, high.test_every) == (150, 0, 25)
    assert quick["vgg-noisy-lr0.05-seed1"].steps == 100
    small = report.scaled_suite(report.SUITES["gpu"], steps=30, seeds=(4,))
    assert small.vgg.steps == 30 and small.vgg.ics_every == 1 and small.seeds == (4,)
    assert small.vgg.test_every == 5 and small.dln.steps == 10_000


def test_l1_and_l2_layers_are_batchnorm_times_a_constant_on_gaussian_data():
    """The premise of claim 15's cause: on zero-mean Gaussian activations (every DLN layer's)
    the l1 layer is BatchNorm times sqrt(pi / 2) and the l2 layer BatchNorm itself, since
    mean |x| = sqrt(2 / pi) std and sqrt(mean x^2) = std; checked against F.batch_norm."""
    x = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bn = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-12)
    for p, factor in ((1, math.sqrt(math.pi / 2)), (2, 1.0)):
        y = bnkernels.lp_norm(x, p, training=True, eps=1e-12)
        ratio = (y / bn).median(0).values
        torch.testing.assert_close(ratio, torch.full_like(ratio, factor), atol=0, rtol=0.01)


def _run(name: str, records: list[dict], **cfg) -> report.Run:
    from pathlib import Path

    return report.Run(name, Path("."), RunConfig(**cfg), records)


def test_claim_causes_are_computed_from_the_runs():
    """A claim that fails in a seed gets its cause with the runs' numbers; one that held in
    every seed gets none."""
    s = report.SUITES["quick"]
    lr = s.vgg.lr

    def probe(step, loss, lo, hi):
        return {"kind": "landscape", "step": step, "direction": "gradient", "loss": loss,
                "loss_min": lo, "loss_max": hi}

    std = [probe(0, 2.30, 2.29, 2.30), probe(15, 2.29, 2.28, 2.29), probe(30, 1.0, 0.5, 3.0),
           probe(45, 0.8, 0.4, 2.4)]
    bn = [probe(k, 0.1, 0.1, 0.11) for k in (0, 15, 30, 45)]
    by_seed = {0: {"vgg-none-lr0.05": _run("a", std, norm="none", lr=lr),
                   "vgg-batchnorm-lr0.05": _run("b", bn, norm="batchnorm", lr=lr)}}
    row = {"per_seed": [{"seed": 0, "held": "not held"}], "held_in": 0, "measured_in": 1}
    loss_band = report.CLAIMS[7]
    assert loss_band.check is claims_landscape._c_loss_band
    why = report.explain(loss_band, row, by_seed, s)
    assert why.startswith("(a) scale") and "at chance loss in 2 of 4 probes" in why
    assert "loss-band width is 2.25 vs BN's 0.01" in why
    assert report.explain(loss_band, {**row, "held_in": 1}, by_seed, s) is None

    def dln(norm, final, std0):
        return _run(norm, [{"kind": "train", "step": 999, "loss": final},
                           {"kind": "act", "step": 0, "layer": 9, "units": [0],
                            "var": [std0 ** 2], "mean": [0.0]}],
                    model="dln", norm=norm, lr=1e-6)

    runs = {f"dln-{n}-lr1e-06": dln(n, f, v) for n, f, v in
            (("none", 9e4, 1.0), ("batchnorm", 8e3, 1.0), ("l1", 8.08e3, 1.2533),
             ("l2", 8e3, 1.0), ("linf", 9e3, 0.3))}
    why = report.explain(report.CLAIMS[14], row, {0: runs}, s)
    assert why.startswith("(c) checked") and "l1 / BN 1.01" in why and "1.253 times BN" in why
