"""Noisy BatchNorm (Algorithm 1 of the paper): noise generation, statistics, and gradients.

The fp64 oracle is PyTorch's own F.batch_norm (the BatchNorm output a) composed with the noise
(s, m) from the reference generator, whose Philox is checked against the Random123 known-answer
vectors: out = act(s * a + m), differentiated by torch autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, assert_close, assert_no_worse_than_torch, make_inputs, use_backend

import bnkernels as bnk
from bnkernels.backends import reference as R
from bnkernels.backends.triton import common as triton_common

BACKENDS = ["triton", "triton-split", "reference", "cpu"]
CFG = bnk.NoiseConfig()


def _interpreted() -> bool:
    return bnk.backends.backend("triton").interpreting()


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    def words(key, ctr):
        c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
        return [int(v) for v in R.philox4x32(key, *c)]

    assert words(0, (0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words(2**64 - 1, (2**32 - 1,) * 4) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words(0x299F31D0A4093822, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _m_tolerance(seed, step, x) -> torch.Tensor:
    """The bound on |m_gpu - m_ref| per element, m = mu + r_mu t (t = 2u - 1, exact): the GPU
    computes fma(r_mu, t, mu), one rounding; the reference rounds r_mu t, then the sum. With
    U = ulp(max(|mu|, r_mu)): the product's rounding is at most ulp(r_mu)/2 <= U/2, and each
    result's own rounding at most ulp(2 max(|mu|, r_mu))/2 = U, so they differ by at most
    2.5 U."""
    C = x.shape[1]
    ch = torch.arange(C, dtype=torch.int64)
    zero = torch.zeros_like(ch)
    q0 = R.philox4x32(seed, ch, zero, zero + (step & 0xFFFFFFFF), zero + 1)[0]
    mu = (CFG.n_mu * (2.0 * ((q0 >> 8).to(torch.float32) + 0.5) * 2.0**-24 - 1.0)).float()
    big = mu.abs().clamp_min(CFG.r_mu)
    _, e = torch.frexp(big)  # big = f * 2^e, f in [0.5, 1): ulp(big) = 2^(e - 24)
    ulp = torch.ldexp(torch.ones_like(big), (e - 24).to(torch.int32))
    shape = [1, C] + [1] * (x.dim() - 2)
    return (2.5 * ulp).view(shape).expand(x.shape)


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_noise_equals_reference_noise(channels_last, device):
    """Across backends: the uniforms are the same bits; m = mu + r_mu (2u - 1) agrees within
    2.5 ulp(max(|mu|, r_mu)) on a GPU (a fused multiply-add rounds once, the reference twice:
    :func:`_m_tolerance`) and exactly in the interpreter, and s (through log/cos/sqrt: the
    GPU's log and cos are libdevice's precise versions, its sqrt the fast approximation, and
    PyTorch's CPU log/cos are not correctly rounded either) within 2e-6 relative."""
    x = make_inputs(Case((3, 5, 6, 7), channels_last), device)["x"]
    use_backend("triton")
    s_t, m_t = bnk.noisy_batch_norm_noise(x, seed=2**40 + 17, step=123)
    # The noise depends on the logical index only, not on the memory format.
    s_c, m_c = bnk.noisy_batch_norm_noise(x.contiguous(), seed=2**40 + 17, step=123)
    assert torch.equal(m_c, m_t) and torch.equal(s_c, s_t)
    use_backend("reference")
    s_r, m_r = bnk.noisy_batch_norm_noise(x, seed=2**40 + 17, step=123)
    if _interpreted():
        assert torch.equal(m_t, m_r)
    else:
        tol = _m_tolerance(2**40 + 17, 123, x)
        assert bool(((m_t.cpu() - m_r.cpu()).abs() <= tol).all())
    assert bool(((s_t.cpu() - s_r.cpu()).abs() <= 2e-6 * s_r.cpu().abs().clamp_min(1)).all())


def test_m_tolerance_covers_one_rounding_and_is_tight():
    """The GPU's m, emulated exactly: fma(r_mu, t, mu) is the fp32 rounding of the exact
    r_mu t + mu (the product of two fp32 values is exact in fp64, and so is its sum with mu
    here: |mu| and r_mu are within 2^29 of each other's ulp). It stays within
    :func:`_m_tolerance` of the reference, and the old bound of 2 ulp(m) would not hold."""
    x = torch.empty(3, 5, 6, 7)
    seed, step = 2**40 + 17, 123
    s_r, m_r = R.noisy_bn_noise_reference(x, (CFG, seed, step))
    # t = 2u - 1 from the reference's own uniforms (m_r = fl(fl(r_mu t) + mu)): regenerate them
    n = x.numel()
    idx = torch.arange(n, dtype=torch.int64)
    zero = torch.zeros_like(idx)
    r0 = R.philox4x32(seed, idx & 0xFFFFFFFF, idx >> 32, zero + step, zero)[0]
    t = 2.0 * (((r0 >> 8).to(torch.float32) + 0.5) * 2.0**-24) - 1.0
    C = x.shape[1]
    ch = torch.arange(C, dtype=torch.int64)
    zc = torch.zeros_like(ch)
    q0 = R.philox4x32(seed, ch, zc, zc + step, zc + 1)[0]
    mu = (CFG.n_mu * (2.0 * ((q0 >> 8).to(torch.float32) + 0.5) * 2.0**-24 - 1.0)).float()
    mu_e = mu.view(1, C, 1).expand(x.shape[0], C, n // (x.shape[0] * C)).reshape(x.shape)
    fma = (torch.tensor(CFG.r_mu, dtype=torch.float32).double() * t.double().view(x.shape)
           + mu_e.double()).float()
    twice = (torch.tensor(CFG.r_mu, dtype=torch.float32) * t.view(x.shape)) + mu_e
    assert torch.equal(twice, m_r)  # the reference is the twice-rounded formula
    diff = (fma - m_r).abs()
    assert bool((diff <= _m_tolerance(seed, step, x)).all())
    old = 2 * torch.finfo(torch.float32).eps * m_r.abs().clamp_min(2**-10)
    assert bool((diff > old).any())  # the bound the GPU failed: 2 ulp of m


@pytest.mark.parametrize("backend", ["triton", "triton-split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_regenerate_the_same_noise(backend, channels_last, device):
    """Within a backend the noise is the same bits wherever it is made: in the forward, in the
    backward and in noisy_batch_norm_noise. In fp64 the output and the bias gradient are exact
    enough (1e-12) to see a one-ulp difference of the fp32 noise (1e-7)."""
    use_backend(backend)
    case = Case((4, 3, 5, 6), channels_last, torch.float64)
    inp = make_inputs(case, device)
    step = torch.tensor([7], device=device)
    s, m = bnk.noisy_batch_norm_noise(inp["x"], CFG, seed=9, step=step)
    x = inp["x"].clone().requires_grad_()
    b = inp["bias"].clone().requires_grad_()
    y = bnk.noisy_batch_norm(x, None, None, inp["weight"], b, True, seed=9, step=step)
    step += 1  # the backward must use the step of the forward
    y.backward(inp["dy"])
    a = F.batch_norm(inp["x"], None, None, inp["weight"], inp["bias"], True)
    assert float((y.detach() - (s.double() * a + m.double())).abs().max()) < 1e-12
    dims = [0, *range(2, x.dim())]
    expected_db = (inp["dy"] * s.double()).sum(dims)
    assert float((b.grad - expected_db).abs().max()) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_distribution(backend, device):
    """Per channel: m - mu_j lies in [-r_mu, r_mu] and is uniform; (s - sigma_j)/r_sigma is
    standard normal; mu_j in [-n_mu, n_mu], sigma_j in [1, n_sigma]; new step, new parameters.

    mu_j and sigma_j are estimated by the channel means of m and s (M = 8192 values each).
    Bounds are 6 standard errors (a false failure has probability < 1e-8 per check)."""
    use_backend(backend)
    x = torch.zeros(8, 4, 32, 32, device=device)
    M = 8 * 32 * 32
    params = []
    for step in (0, 1):
        s, m = bnk.noisy_batch_norm_noise(x, CFG, seed=5, step=step)
        s = s.transpose(0, 1).reshape(4, -1).double().cpu()
        m = m.transpose(0, 1).reshape(4, -1).double().cpu()
        mu, sigma = m.mean(1), s.mean(1)
        se_mu, se_sigma = CFG.r_mu / (3 * M) ** 0.5, CFG.r_sigma / M**0.5
        assert bool(((mu.abs() <= CFG.n_mu + 6 * se_mu)).all()), mu
        assert bool(((sigma >= 1 - 6 * se_sigma) & (sigma <= CFG.n_sigma + 6 * se_sigma)).all())
        dev_m = m - mu[:, None]
        assert float(dev_m.abs().max()) <= CFG.r_mu * (1 + 1e-3) + 6 * se_mu
        # Uniform on [-r, r]: variance r^2 / 3; standard error of the variance estimate is
        # sqrt(4/45) r^2 / sqrt(M).
        var_u = CFG.r_mu**2 / 3
        assert abs(float(dev_m.var(1).max()) - var_u) < 6 * (4 / 45) ** 0.5 * CFG.r_mu**2 / M**0.5
        z = (s - sigma[:, None]) / CFG.r_sigma
        assert float(z.var(1).sub(1).abs().max()) < 6 * (2 / M) ** 0.5
        # Fourth moment of a standard normal is 3 (a uniform would give 1.8).
        assert float((z**4).mean(1).sub(3).abs().max()) < 6 * (96 / M) ** 0.5
        params.append((mu, sigma))
    assert bool((params[0][0] != params[1][0]).all()) and bool((params[0][1] != params[1][1]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_regression_on_batchnorm_output(backend, device):
    """The issue's test: regress the noisy output on the BatchNorm output a, per channel.

    out = s a + m = sigma_j a + mu_j + e with E[e | a] = 0 and
    Var(e | a) = r_sigma^2 a^2 + r_mu^2 / 3. With M = 4096 values per channel, the OLS slope
    and intercept have standard errors below 0.003; bounds are the paper's ranges widened by
    6 standard errors. The residual variance must match its model within 6 standard errors of
    the mean of e^2 / Var(e | a) (which is 1 with standard error sqrt(2 / M) for normal e)."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 32, 32, generator=g) * 2 + 1).to(device)
    M = 4 * 32 * 32
    a = F.batch_norm(x.double(), None, None, training=True).transpose(0, 1).reshape(3, -1).cpu()
    for step in (0, 1):
        out = bnk.noisy_batch_norm(x, None, None, training=True, seed=11, step=step)
        out = out.double().transpose(0, 1).reshape(3, -1).cpu()
        design = torch.stack([a, torch.ones_like(a)], dim=2)  # [C, M, 2]
        coef = torch.linalg.lstsq(design, out.unsqueeze(2)).solution.squeeze(2)
        slope, intercept = coef[:, 0], coef[:, 1]
        assert bool(((slope >= 1 - 0.02) & (slope <= CFG.n_sigma + 0.02)).all()), slope
        assert bool((intercept.abs() <= CFG.n_mu + 0.02).all()), intercept
        resid = out - slope[:, None] * a - intercept[:, None]
        model = CFG.r_sigma**2 * a**2 + CFG.r_mu**2 / 3
        ratio = (resid**2 / model).mean(1)
        assert float((ratio - 1).abs().max()) < 6 * (2 / M) ** 0.5, ratio
        if step == 0:
            first = slope
        else:
            assert bool((slope != first).all())


def _exact(inp, case, training, activation, seed, step, affine=True):
    """fp64 oracle: torch's BatchNorm composed with the reference noise, torch autograd."""
    x = inp["x"].double().requires_grad_()
    w = inp["weight"].double().requires_grad_() if affine else None
    b = inp["bias"].double().requires_grad_() if affine else None
    rm, rv = inp["running_mean"].double(), inp["running_var"].double()
    a = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if training:
        s, m = R.noisy_bn_noise_reference(inp["x"], (CFG, seed, step))
        a = s.double() * a + m.double()
    out = F.relu(a) if activation == "relu" else a
    out.backward(inp["dy"].double())
    return dict(y=out, dx=x.grad, dweight=w.grad if affine else None,
                dbias=b.grad if affine else None, running_mean=rm, running_var=rv)


def _ours(inp, training, activation, seed, step, affine=True, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t.clone())
    x = cast(inp["x"]).requires_grad_()
    w = cast(inp["weight"]).requires_grad_() if affine else None
    b = cast(inp["bias"]).requires_grad_() if affine else None
    rm, rv = cast(inp["running_mean"]), cast(inp["running_var"])
    y = bnk.noisy_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, CFG, seed, step, activation)
    y.backward(cast(inp["dy"]))
    return dict(y=y, dx=x.grad, dweight=w.grad if affine else None,
                dbias=b.grad if affine else None, running_mean=rm, running_var=rv)


CASES = [
    Case((5, 3, 17, 23)), Case((5, 3, 17, 23), True), Case((16, 13)), Case((2, 4, 3, 5, 6), True),
    Case((4, 67, 3, 5), False, torch.float16), Case((3, 7, 5, 4), True, torch.bfloat16),
    Case((6, 5, 11), False, torch.float16, torch.float32),
    Case((5, 3, 17, 23), True, torch.bfloat16, torch.float32),
]


ORACLE = ([(be, c, act) for be in ("triton", "reference", "cpu") for c in CASES
           for act in (None, "relu")]
          + [("triton-split", c, act) for c in CASES[::2] for act in (None, "relu")])


@pytest.mark.parametrize(("backend", "case", "activation"), ORACLE, ids=str)
def test_matches_fp64_oracle(backend, case, activation, device):
    use_backend(backend)
    inp = make_inputs(case, device)
    ours = _ours(inp, True, activation, seed=3, step=9)
    exact = _exact(inp, case, True, activation, seed=3, step=9)
    for key, value in ours.items():
        dt = case.dtype if key in ("y", "dx") else case.pdtype
        assert_close(value, exact[key], dt, name=f"{backend} {case} {key}")


@pytest.mark.parametrize("case", [Case((5, 3, 17, 23), True, torch.bfloat16),
                                  Case((4, 6, 5, 7), False, torch.float16)], ids=str)
def test_low_precision_no_worse_than_torch_composite(case, device):
    """Against the eager composite at the same dtype (F.batch_norm, then s * a + m in that
    dtype): our error versus fp64 is at most 2x the composite's."""
    inp = make_inputs(case, device)
    ours = _ours(inp, True, None, seed=1, step=2)
    exact = _exact(inp, case, True, None, seed=1, step=2)
    x = inp["x"].clone()
    s, m = R.noisy_bn_noise_reference(x, (CFG, 1, 2))
    a = F.batch_norm(x, inp["running_mean"].clone(), inp["running_var"].clone(), inp["weight"],
                     inp["bias"], True)
    theirs = s.to(case.dtype) * a + m.to(case.dtype)
    assert_no_worse_than_torch(ours["y"], theirs, exact["y"], case.dtype, "y")


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fp64(backend, activation, affine, channels_last, device):
    use_backend(backend)
    inp = make_inputs(Case((3, 2, 3, 2), channels_last, torch.float64), device, seed=4)
    x = inp["x"].requires_grad_()
    w = inp["weight"].requires_grad_() if affine else None
    b = inp["bias"].requires_grad_() if affine else None

    def f(x, w, b):
        return bnk.noisy_batch_norm(x, None, None, w, b, True, seed=7, step=3,
                                    activation=activation)

    # The interpreted Triton noise kernels cost ~0.1 s a launch, and a full gradcheck makes
    # ~400 launches: there, one combination gets the full Jacobian check and the others the
    # fast (random-projection) gradcheck, which still compares the analytical backward with
    # finite differences in fp64.
    fast = (backend == "triton" and device.type == "cpu"
            and not (activation == "relu" and affine and channels_last))
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_by_seed_and_step(backend, device):
    use_backend(backend)
    inp = make_inputs(Case((5, 6, 7, 9), True), device)
    with triton_common.override_config(split=5, block_m=32, block_c=4):
        use_backend(backend)
        a = _ours(inp, True, "relu", seed=1, step=4)
        b = _ours(inp, True, "relu", seed=1, step=4)
        other_step = _ours(inp, True, "relu", seed=1, step=5)
        other_seed = _ours(inp, True, "relu", seed=2, step=4)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["y"], other_step["y"])
    assert not torch.equal(a["y"], other_seed["y"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_is_the_noise_expectation(backend, device):
    """Eval: no random noise; act(E[s] a + E[m]) with the running statistics, E[s] = 1.125."""
    use_backend(backend)
    inp = make_inputs(Case((5, 3, 17, 23)), device)
    args = (inp["x"], inp["running_mean"], inp["running_var"])
    y = bnk.noisy_batch_norm(*args, inp["weight"], inp["bias"], training=False, seed=3, step=8,
                             activation="relu")
    assert CFG.expectation() == (1.125, 0.0)
    a = F.batch_norm(inp["x"].double(), inp["running_mean"].double(),
                     inp["running_var"].double(), inp["weight"].double(), inp["bias"].double())
    assert_close(y, F.relu(1.125 * a), torch.float32, "y")
    again = bnk.noisy_batch_norm(*args, inp["weight"], inp["bias"], training=False, seed=4,
                                 step=9, activation="relu")
    assert torch.equal(y, again)  # no noise: seed and step do not matter
    y = bnk.noisy_batch_norm(*args, training=False)  # no affine: E[s] xhat + E[m]
    assert_close(y, 1.125 * F.batch_norm(inp["x"].double(), inp["running_mean"].double(),
                                         inp["running_var"].double()), torch.float32, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_tensor_is_read_on_device_and_snapshotted(backend, device):
    """A step tensor gives the same noise as the int; the backward uses the forward's step even
    if the buffer was advanced in between (as a module does)."""
    use_backend(backend)
    inp = make_inputs(Case((4, 3, 5, 6)), device)
    ref = _ours(inp, True, "relu", seed=3, step=41)
    step = torch.tensor([41], device=device)
    x = inp["x"].clone().requires_grad_()
    y = bnk.noisy_batch_norm(x, None, None, inp["weight"], inp["bias"], True, seed=3, step=step,
                             activation="relu")
    step += 1
    y.backward(inp["dy"])
    assert torch.equal(y, ref["y"])
    assert torch.equal(x.grad, ref["dx"])


def test_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="n_sigma must be finite and >= 1"):
        bnk.NoiseConfig(n_sigma=0.5)
    with pytest.raises(ValueError, match="r_mu must be finite and >= 0"):
        bnk.NoiseConfig(r_mu=-0.1)
    with pytest.raises(TypeError, match="noise must be a bnkernels.NoiseConfig"):
        bnk.noisy_batch_norm(x, None, None, training=True, noise=(0.5, 1.25))
    with pytest.raises(ValueError, match="seed must be an int"):
        bnk.noisy_batch_norm(x, None, None, training=True, seed=-1)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        bnk.noisy_batch_norm(x, None, None, training=True, step=1.5)
    with pytest.raises(ValueError, match="a step tensor must hold one integer"):
        bnk.noisy_batch_norm(x, None, None, training=True, step=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnk.noisy_batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="weight should contain 3 elements"):
        bnk.noisy_batch_norm(x, None, None, torch.ones(2), training=True)
