"""The cpu backend's own parts: its noise (the reference's bits), the noise it keeps for the
backward, its build cache, and its low-precision parameter path. Its numerics against PyTorch
and the reference run in the shared matrices (test_batch_norm, test_lp_norm,
test_noisy_batch_norm, test_double_backward, test_fuzz: backend "cpu")."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import use_backend

import bnkernels as bnk
from bnkernels.backends import plan as P
from bnkernels.backends.cpu import build, noise_of
from bnkernels.backends.reference import formulas as R

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the cpu backend runs CPU tensors")
CFG = bnk.NoiseConfig()


@pytest.mark.parametrize(("shape", "seed", "step"), [
    ((3, 5, 7, 9), 0, 0),  # S = 63: the 16-wide Philox path and its tail
    ((2, 3), 2**40 + 7, 2**31 + 3),  # (N, C): S = 1
    ((4, 6, 11), 12345, 2**33 + 5),  # a step past 2^32 (taken mod 2^32, as every backend)
    ((1, 2, 4, 4, 3), 2**62 + 1, 7),
])
def test_noise_is_the_references_bit_for_bit(shape, seed, step):
    x = torch.empty(shape)
    s, m = noise_of(build.library(), x, (CFG, seed, step))
    rs, rm = R.noisy_bn_noise_reference(x, (CFG, seed, step))
    assert torch.equal(s, rs) and torch.equal(m, rm)
    # and not by construction: another step gives other noise
    s2, _ = noise_of(build.library(), x, (CFG, seed, step + 1))
    assert not torch.equal(s, s2)


def test_noise_with_a_step_tensor_and_the_public_function():
    use_backend("cpu")
    x = torch.empty(2, 3, 5, 5).to(memory_format=torch.channels_last)
    got = bnk.noisy_batch_norm_noise(x, CFG, seed=9, step=torch.tensor([41]))
    want = R.noisy_bn_noise_reference(x, (CFG, 9, 41))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_kept_noise_backward_equals_the_regenerated_one(channels_last, activation):
    """The forward keeps (s, m) for the backward; regenerating them from the key, as the GPU
    kernels do, gives bit-identical gradients."""
    use_backend("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 5, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    dy = torch.randn(x.shape, generator=g)
    noise = (CFG, 5, 8)
    bnk.noisy_batch_norm(x, None, None, w, b, training=True, activation=activation, seed=5,
                         step=8)
    plan = next(p for s, p in P.PLANS.items() if s.noisy is not None)
    y, a, inv, _ = plan.forward(x, w, b, P.Call(None, None, plan, 0.1, 1e-5, noise, None))
    assert isinstance(a, tuple)  # (mean, s, m)
    kept = plan.backward(dy, x, w, b, P.Saved(a, inv, 1e-5, noise), (True, True, True))
    regen = plan.backward(dy, x, w, b, P.Saved(a[0], inv, 1e-5, noise), (True, True, True))
    for k, r in zip(kept, regen):
        assert torch.equal(k, r)
    from bnkernels.library import _saved_or_empty  # what the registered op returns

    mean, second = _saved_or_empty(x, a, inv)
    assert mean is a[0] and second is inv


def test_float16_parameters_and_buffers_match_the_reference():
    """float16 x with float16 weight, bias and running buffers: float32 copies go in, and the
    buffers are written back (in float16, as the reference rounds them)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, 5, generator=g).half()
    out = {}
    for backend in ("cpu", "reference"):
        use_backend(backend)
        rm, rv = torch.zeros(4).half(), torch.ones(4).half()
        w = torch.randn(4, generator=torch.Generator().manual_seed(2)).half().requires_grad_()
        xr = x.clone().requires_grad_()
        y = bnk.batch_norm(xr, rm, rv, w, None, training=True)
        y.float().sum().backward()
        out[backend] = (y, rm, rv, xr.grad, w.grad)
    for a, b in zip(out["cpu"], out["reference"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3)


def test_the_library_is_cached_and_loaded_without_compiling(monkeypatch):
    assert not isinstance(build.library(), str)
    cc = build.compilers()[0]
    path = build.library_path(cc)
    assert path.exists() and path.parent == build.cache_root()
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("compiled again"))
    lib = build._load()
    assert not isinstance(lib, str) and lib.bnk_bn_fwd_f32 is not None


def test_the_cache_hash_covers_every_file_the_kernels_include(monkeypatch, tmp_path):
    """build.SOURCES are kernels.c and the files it includes, transitively (the Philox header
    it shares with the reference among them), and an edit to any of them names another
    library (a cached library never outlives a change of its sources)."""
    import re
    import shutil

    here = build._HERE
    seen, todo = set(), [here / "kernels.c"]
    while todo:
        f = todo.pop().resolve()
        if f not in seen:
            seen.add(f)
            todo += [f.parent / inc for inc in
                     re.findall(r'^#include "([^"]+)"', f.read_text(), re.M)]
    assert seen == {(here / s).resolve() for s in build.SOURCES}
    cpu = tmp_path / "backends" / "cpu"
    for s in build.SOURCES:
        (cpu / s).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(here / s, cpu / s)
    monkeypatch.setattr(build, "_HERE", cpu)
    cc = ["cc"]
    first = build.library_path(cc)
    assert first == build.library_path(cc)
    for s in build.SOURCES:
        text = (cpu / s).read_text()
        (cpu / s).write_text(text + "\n")
        assert build.library_path(cc) != first, s
        (cpu / s).write_text(text)
    assert build.library_path(cc) == first


def test_a_failed_build_is_a_reason(monkeypatch, tmp_path):
    """A compiler that fails: the reason names it and its error; nothing is cached."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build, "compilers", lambda: [["false"]])
    why = build._load()
    assert isinstance(why, str) and why.startswith("false failed on kernels.c")
    assert not list(tmp_path.rglob("*.so"))


def test_inf_and_nan_channels_as_the_reference():
    """A channel with +inf, one with NaN, one with both infinities: mean, variance, running
    buffers and outputs as the reference's (torch's rule: the mean is the sum)."""
    x = torch.randn(3, 4, 5)
    x[1, 0, 2] = math.inf
    x[0, 1, 0] = math.nan
    x[2, 2, 1], x[0, 2, 3] = math.inf, -math.inf
    res = {}
    for backend in ("cpu", "reference"):
        use_backend(backend)
        rm, rv = torch.zeros(4), torch.ones(4)
        y = bnk.batch_norm(x, rm, rv, training=True)
        res[backend] = (y, rm, rv)
    for a, b in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isinf(res["cpu"][1][0]) and torch.isnan(res["cpu"][2][:3]).all()
