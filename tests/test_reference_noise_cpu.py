"""The reference backend's CPU noise generator (Philox in compiled C, or chunked numpy without a
C compiler; in-place float math) gives the bits of the plain torch formulation: Philox4x32-10 on
int64 tensors (itself checked against Random123's known answers in test_noisy_batch_norm.py),
then gathers per channel."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

import bnkernels as bnk
from bnkernels.backends.reference import formulas as R

M32 = 0xFFFFFFFF


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["c", "numpy"])
def philox_path(request, monkeypatch):
    """Run a test on the compiled Philox (skipped without a working C compiler) and on the
    numpy one (the compiled function marked unavailable, as when no compiler is found)."""
    if request.param == "c":
        if not R._philox_c():
            pytest.skip("no C compiler (or the compiled Philox failed its check): numpy path")
    else:
        monkeypatch.setattr(R, "_PHILOX_FN", False)
    return request.param


@pytest.mark.parametrize(("seed", "start", "n", "step"), [
    (0, 0, 1, 0),
    (1, 0, 2**17 + 3, 5),  # odd n, past the C path's per-thread minimum
    (2**40 + 7, 2**32 - 100, 2**17 + 1, 2**31 + 3),  # seed, step and counters past 31/32 bits
    (5, 0, 70001, 7),  # five passes, the last one short
    (2**64 - 1, 12345, 16385, 2**32 - 1),  # unaligned start
    (2**40 + 17, 2**32 - 20000, 40000, 123),  # across i = 2^32: i >> 32 changes mid-range
    (3, 2**33 + 5, 999, 2**35 + 9),  # a step past 32 bits is taken mod 2^32
    (9, 0, 0, 3),
])
def test_cpu_philox_equals_the_torch_formulation(philox_path, seed, start, n, step):
    fast = R._philox_top_bits_cpu(seed, n, step, start)
    plain = R._philox_top_bits_torch(seed, n, step & M32, "cpu", start)
    assert fast.dtype == torch.float32 and fast.shape == (3, n)
    assert torch.equal(fast, plain)


def test_cpu_philox_threads_give_the_same_bits(philox_path, threads):
    """With several torch threads the counters are shared among threads: same bits."""
    n = 40 * R._CHUNK + 123
    threads(1)
    one = R._philox_top_bits_cpu(11, n, 5)
    threads(3)
    assert torch.equal(R._philox_top_bits_cpu(11, n, 5), one)
    assert torch.equal(R._philox_top_bits_torch(11, n, 5, "cpu"), one)


def _has_compiler() -> bool:
    return any(shutil.which(cc[0]) for cc in R._c_compilers())


def test_compiled_philox_is_used_where_a_compiler_is(monkeypatch):
    """With a C compiler on PATH the compiled function is built, and _philox_top_bits_cpu
    uses it: with numpy's path made to fail, it still gives the torch formulation's bits."""
    if not _has_compiler():
        pytest.skip(f"no C compiler among {R._c_compilers()}: the numpy path is used")
    assert R._philox_c(), "a C compiler is present but the compiled Philox was not built"

    def numpy_path(*args):
        raise AssertionError("the numpy Philox ran although the compiled one is available")

    monkeypatch.setattr(R, "_philox_passes", numpy_path)
    got = R._philox_top_bits_cpu(2**40 + 7, 70001, 2**31 + 3, 2**32 - 20000)
    assert torch.equal(got, R._philox_top_bits_torch(2**40 + 7, 70001, 2**31 + 3, "cpu",
                                                     2**32 - 20000))


def test_compiled_philox_leaves_no_files(monkeypatch, tmp_path):
    """The library is built in a private temporary directory, removed once it is loaded."""
    if not _has_compiler():
        pytest.skip(f"no C compiler among {R._c_compilers()}")
    monkeypatch.setattr(R, "_PHILOX_FN", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert R._philox_c()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compiler", [["bnkernels-no-such-cc"], ["false"]],
                         ids=["missing", "fails"])
def test_without_a_working_compiler_numpy_gives_the_bits(monkeypatch, compiler):
    """No compiler, or one that fails: the first call falls back to numpy, silently, for the
    process (the next call does not try again), with the same bits."""
    monkeypatch.setattr(R, "_PHILOX_FN", None)
    monkeypatch.setattr(R, "_c_compilers", lambda: [compiler])
    got = R._philox_top_bits_cpu(2**40 + 7, 70001, 2**31 + 3, 2**32 - 20000)
    assert R._PHILOX_FN is False
    assert torch.equal(got, R._philox_top_bits_torch(2**40 + 7, 70001, 2**31 + 3, "cpu",
                                                     2**32 - 20000))
    tries = []
    monkeypatch.setattr(R, "_build_philox_c", lambda: tries.append(1) or False)
    R._philox_top_bits_cpu(1, 10, 1)
    assert tries == []


def _noise_by_gathers(x, cfg, seed, step):
    """The noise as first written: int64 Philox per element, per-channel values gathered by
    each element's channel index."""
    C = x.shape[1]
    spatial = x.numel() // max(1, x.shape[0] * C)
    idx = torch.arange(x.numel(), dtype=torch.int64)
    ch = torch.arange(C, dtype=torch.int64)
    zc = torch.zeros_like(ch)
    q0, q1, _, _ = R.philox4x32(seed, ch, zc, zc + (step & M32), zc + 1)
    mu = cfg.n_mu * (2.0 * R._uniform(q0) - 1.0)
    sigma = 1.0 + (cfg.n_sigma - 1.0) * R._uniform(q1)
    z0 = torch.zeros_like(idx)
    r0, r1, r2, _ = R.philox4x32(seed, idx & M32, idx >> 32, z0 + (step & M32), z0)
    chan = (idx // spatial) % C
    m = mu[chan] + cfg.r_mu * (2.0 * R._uniform(r0) - 1.0)
    z = torch.sqrt(-2.0 * torch.log(R._uniform(r1))) * torch.cos(6.283185307179586
                                                                 * R._uniform(r2))
    s = sigma[chan] + cfg.r_sigma * z
    return s.reshape(x.shape), m.reshape(x.shape)


@pytest.mark.parametrize(("shape", "seed", "step"), [
    ((3, 5, 6, 7), 2**40 + 17, 123),
    ((17, 23, 11), 99, 2**31 + 3),
    ((7, 3), 2**64 - 1, 2**32 + 5),
    ((5, 4, 3, 2, 3), 11, torch.tensor([9])),
    ((2, 3, 40000), 3, 1),
    ((0, 3, 4), 1, 1),
])
@pytest.mark.parametrize("cfg", [bnk.NoiseConfig(), bnk.NoiseConfig(0.3, 1.7, 0.05, 0.2)],
                         ids=["paper", "other"])
def test_cpu_noise_is_bit_identical_to_the_gather_formulation(shape, seed, step, cfg):
    x = torch.empty(shape)
    s, m = R.noisy_bn_noise_reference(x, (cfg, seed, step))
    step_int = int(step) if isinstance(step, torch.Tensor) else step
    s_ref, m_ref = _noise_by_gathers(x, cfg, seed, step_int)
    assert s.dtype == m.dtype == torch.float32 and s.shape == m.shape == x.shape
    assert torch.equal(m, m_ref) and torch.equal(s, s_ref)
