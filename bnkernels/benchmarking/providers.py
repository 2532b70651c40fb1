"""Providers: the implementations a benchmark compares, and the passes it times.

Every provider gives, for an op, a forward ``f(x, running_mean, running_var_or_scale, weight,
bias, training) -> y`` and a context (cuDNN flags, bnkernels backend) active while it runs.
The ops are those the registered op families name for the benchmarks (their descriptors'
``bench``: :class:`bnkernels.backends.family.BenchOp`): the bnkernels providers run each op's
``run``, the eager ones its ``eager`` composite, the correctness check its ``oracle``; an op no
family names raises :class:`~bnkernels.backends.family.UnknownOpError`. The built-in
families' makers are below (:func:`bnkernels_batch_norm`, ...).

| provider            | batch_norm                  | noisy_batch_norm / lp_norm                   |
|---------------------|-----------------------------|----------------------------------------------|
| cudnn               | F.batch_norm, cuDNN enabled | the same plain BatchNorm (a baseline of the  |
| torch-native        | F.batch_norm, cuDNN off     | same memory traffic: no noise / BN's l_2     |
| torch-compile       | torch.compile(F.batch_norm) | statistics), measured once per input         |
| eager               | -                           | the op as a torch composite (below)          |
| eager-compile       | -                           | torch.compile of that composite              |
| bnkernels-triton    | bnkernels, triton backend   | bnkernels, triton backend                    |
| bnkernels-cuda      | bnkernels, cuda backend     | bnkernels, cuda backend (when built)         |
| bnkernels-reference | bnkernels, reference backend (eager oracle; CPU runs only, or when asked)  |

The eager composites: noisy BatchNorm is ``s * F.batch_norm(x) + m`` with the noise of
Algorithm 1 drawn by torch's RNG (per-channel mu, sigma; per-element m, s of x's shape and
dtype, saved by autograd for the backward); l_p is the formula of :func:`bnkernels.lp_norm`
(statistics in fp32) in torch ops. All providers get fp32 weight, bias and running statistics
(the AMP case) and the same input.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends.family import UnknownOpError, bench_op, bench_ops, resolve
from ..families import BATCH_NORM, LP_NORM
from ..noise import NoiseConfig

PASSES = ("fwd-train", "fwd-eval", "bwd", "fwd+bwd")
MOMENTUM, EPS = 0.1, 1e-5
NOISE = NoiseConfig()  # the paper's constants
LP_PS = {"1": 1, "2": 2, "inf": math.inf}

# Bytes moved per pass, in units of B = the bytes of x (x, y, dy, dx all have x's size):
# (compulsory-traffic model, ideal). Forward-train reads x for the statistics, reads it again to
# normalize and writes y (3B; a persistent kernel that keeps x on chip: 2B). Eval reads x and
# writes y (2B). Backward reads x and dy for the reductions, reads them again and writes dx
# (5B; ideal 3B). Forward+backward is the sum. Per-channel vectors are negligible.
TRAFFIC = {"fwd-train": (3, 2), "fwd-eval": (2, 2), "bwd": (5, 3), "fwd+bwd": (8, 5)}

Forward = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- eager composites


def batch_norm_eager(x, running_mean, running_var, weight, bias, training):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def noisy_batch_norm_eager(x, running_mean, running_var, weight, bias, training,
                           noise: NoiseConfig = NOISE):
    """Algorithm 1 as a torch composite: out = s * BN(x) + m, noise from torch's RNG."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    if not training:
        return y
    c = x.shape[1]
    mu = noise.n_mu * (2 * torch.rand(c, device=x.device) - 1)
    sigma = 1 + (noise.n_sigma - 1) * torch.rand(c, device=x.device)
    m = _per_channel(mu.to(x.dtype), x) + noise.r_mu * (2 * torch.rand_like(x) - 1)
    s = _per_channel(sigma.to(x.dtype), x) + noise.r_sigma * torch.randn_like(x)
    return s * y + m


def lp_norm_eager(x, running_mean, running_scale, weight, bias, training, p=2,
                  centered=False):
    """l_p normalization as a torch composite (statistics in fp32), the formula of
    :func:`bnkernels.lp_norm`: y = w * (x - mean) / (s_p + eps) + b."""
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    if training:
        mean = xf.mean(dims)
        z = xf - _per_channel(mean, x) if centered else xf
        if p == 1:
            scale = z.abs().mean(dims)
        elif p == 2:
            scale = z.square().mean(dims).sqrt()
        else:
            scale = z.abs().amax(dims)
        with torch.no_grad():
            running_mean.lerp_(mean.detach(), MOMENTUM)  # r + m (b - r) = m b + (1 - m) r
            running_scale.lerp_(scale.detach(), MOMENTUM)
    else:
        mean, scale = running_mean, running_scale
    y = (xf - _per_channel(mean, x)) * _per_channel(weight / (scale + EPS), x)
    return (y + _per_channel(bias, x)).to(x.dtype)


# ----------------------------------------------------------------------------- the built-in ops
# Makers ``(p) -> f(x, running_mean, running_var_or_scale, weight, bias, training)`` named by
# the built-in families' descriptors (bnkernels.families).


def bnkernels_batch_norm(p=None):
    import bnkernels

    def f(x, rm, rv, w, b, t):
        return bnkernels.batch_norm(x, rm, rv, w, b, t, MOMENTUM, EPS)
    return f


def bnkernels_noisy_batch_norm(p=None):
    import bnkernels

    def f(x, rm, rv, w, b, t):
        return bnkernels.noisy_batch_norm(x, rm, rv, w, b, t, MOMENTUM, EPS, noise=NOISE,
                                          seed=0, step=0)
    return f


def bnkernels_lp_norm(p):
    import bnkernels

    pv = LP_PS[p]

    def f(x, rm, rs, w, b, t):
        return bnkernels.lp_norm(x, pv, rm, rs, w, b, t, MOMENTUM, EPS)
    return f


def _family_norm(op):
    """The default ``run`` of a family's benchmark op: its functional op."""
    def make(p=None):
        from ..functional import norm

        if len(bench_op(op)[0].running) > 1:
            def f(x, rm, rv, w, b, t):
                return norm(op, x, rm, rv, w, b, t, MOMENTUM, EPS)
        else:  # one running buffer: the benchmark's second is not the family's
            def f(x, rm, rv, w, b, t):
                return norm(op, x, rm, None, w, b, t, MOMENTUM, EPS)
        return f
    return make


def noisy_batch_norm_eager_of(p=None):
    return noisy_batch_norm_eager


def lp_norm_eager_of(p):
    pv = LP_PS[p]

    def f(x, rm, rs, w, b, t):
        return lp_norm_eager(x, rm, rs, w, b, t, p=pv)
    return f


def batch_norm_oracle(p=None):
    def f(x, rm, rv, w, b, t):
        return F.batch_norm(x, rm, rv, w, b, t, MOMENTUM, EPS)
    return f


def lp_norm_oracle(p):
    from ..backends.reference import lp_norm_reference_fwd

    pv = LP_PS[p]

    def f(x, rm, rs, w, b, t):
        return lp_norm_reference_fwd(x, pv, rm, rs, w, b, t, MOMENTUM, EPS, False)[0]
    return f


def ops() -> tuple[str, ...]:
    """The benchmark ops of every registered op family (their descriptors' ``bench``)."""
    return tuple(bench_ops())


# The built-in families' ops: the default op list (a family registered later is benchmarked
# when asked for by name: ops() lists it).
OPS = tuple(op for fam in (BATCH_NORM, LP_NORM) for op in fam.bench)


class _CompileBaseline(dict):
    """Which provider a row's ``speedup_vs_compile`` compares against, per op: the compiled
    eager composite where the op has one, else torch.compile(F.batch_norm)."""

    def __missing__(self, op):
        return "eager-compile" if bench_op(op)[1].eager is not None else "torch-compile"


# ----------------------------------------------------------------------------- providers


def _cudnn_flags(enabled: bool):
    """cuDNN settings set explicitly for every torch provider (benchmark mode off: BatchNorm
    has no algorithm choice; deterministic off, as torch's default)."""
    return torch.backends.cudnn.flags(enabled=enabled, benchmark=False, deterministic=False)


@contextlib.contextmanager
def _bnkernels_backend(name: str, jit_launch: bool = False):
    import bnkernels

    before = bnkernels.get_backend()
    bnkernels.set_backend(name)
    try:
        if jit_launch:
            from ..backends.triton.launch import jit_only

            with jit_only():
                yield
        else:
            yield
    finally:
        bnkernels.set_backend(before)


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    Args:
        name: the provider's name in results.
        description: what it runs, for the result file.
        kind: "torch" (F.batch_norm, the plain-BN baseline for every op), "eager" (the op's
            torch composite) or "bnkernels".
        cudnn: cuDNN enabled while it runs (torch and eager kinds).
        compiled: wrapped in torch.compile.
        backend: the bnkernels backend (bnkernels kind).
        default_on_cpu / default_on_cuda: in the default provider list for that device.
    """

    name: str
    description: str
    kind: str
    cudnn: bool = True
    compiled: bool = False
    backend: str | None = None
    default_on_cpu: bool = True
    default_on_cuda: bool = True
    jit_launch: bool = False  # Triton launches through the JIT, not the direct path


    @property
    def ops(self) -> tuple[str, ...]:
        """The ops it serves, of every registered family: the torch baselines and bnkernels
        every op, the eager composites those that have one."""
        return tuple(op for op, (_, b) in bench_ops().items()
                     if self.kind != "eager" or b.eager is not None)

    def computes(self, op: str) -> str:
        """The op this provider actually runs for ``op`` (the torch baselines run plain BN)."""
        bench_op(op)  # an op no family names: UnknownOpError
        return "batch_norm" if self.kind == "torch" else op

    def unavailable(self, device: torch.device, op: str | None = None) -> str | None:
        """Why this provider cannot run on ``device`` (and ``op``), or None."""
        if op is not None and op not in self.ops:
            bench_op(op)  # an op no family names: UnknownOpError
            return f"{self.name} does not implement {op}"
        if self.name == "cudnn":
            if device.type != "cuda":
                return "cuDNN needs a CUDA device"
            if not torch.backends.cudnn.is_available():
                return "cuDNN is not available in this torch build"
        if self.kind == "bnkernels":
            import bnkernels
            import bnkernels.backends
            import bnkernels.functional

            backends = bnkernels.available_backends()
            if self.backend == "auto":  # always something: the reference runs anywhere
                backends = {"auto": []}
            if self.backend not in backends:
                return (f"bnkernels has no {self.backend!r} backend in this build (backends: "
                        f"{', '.join(backends)})")
            if backends[self.backend]:
                return "; ".join(backends[self.backend])
            if self.backend == "cuda" and not bnkernels.backends.backend("cuda").is_built():
                # It would build on first use: minutes inside a warm-up. Build it first.
                return ("the CUDA extension is not built (python -m bnkernels.backends.cuda "
                        "build; make gpu-check does)")
        return None

    def context(self):
        if self.kind == "bnkernels":
            return _bnkernels_backend(self.backend, self.jit_launch)
        return _cudnn_flags(self.cudnn)

    def forward(self, op: str, p: str | None = None, compile_mode: str | None = None
                ) -> Forward:
        """``f(x, running_mean, running_var_or_scale, weight, bias, training) -> y``."""
        op = self.computes(op)
        _, bench = bench_op(op)
        if self.kind == "bnkernels":
            return resolve(bench.run)(p) if bench.run is not None else _family_norm(op)(p)
        if self.kind == "torch":
            fn = batch_norm_eager
        elif bench.eager is None:
            raise UnknownOpError(f"{self.name}: {op!r} has no eager composite (its family's "
                                 "BenchOp names none)")
        else:
            fn = resolve(bench.eager)(p)
        if self.compiled:
            return torch.compile(fn, dynamic=False, mode=compile_mode)
        return fn


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("cudnn", "torch.nn.functional.batch_norm with cuDNN enabled (plain BatchNorm for "
             "every op)", "torch", cudnn=True),
    Provider("torch-native", "torch.nn.functional.batch_norm with cuDNN disabled (PyTorch's "
             "native kernels; plain BatchNorm for every op)", "torch", cudnn=False),
    Provider("torch-compile", "torch.compile(F.batch_norm) (plain BatchNorm for every op)",
             "torch", compiled=True, default_on_cpu=False),
    Provider("eager", "the op as a torch composite: F.batch_norm plus torch-generated noise "
             "(noisy BN); the eager l_p formula (l_p)", "eager"),
    Provider("eager-compile", "torch.compile of the eager composite", "eager",
             compiled=True, default_on_cpu=False),
    Provider("bnkernels-triton", "bnkernels with the triton backend (interpreted on the CPU)",
             "bnkernels", backend="triton"),
    Provider("bnkernels-cuda", "bnkernels with the CUDA C++ backend", "bnkernels",
             backend="cuda", default_on_cpu=False),
    Provider("bnkernels-reference", "bnkernels with the eager reference backend (the oracle)",
             "bnkernels", backend="reference", default_on_cuda=False),
)}

# bnkernels as a user gets it: no set_backend call, the default ("auto") choice per input. The
# overhead and e2e sections time it (their targets are about the default); the kernel suite
# times the backends one by one instead.
AUTO = Provider("bnkernels-auto", "bnkernels with its default backend (\"auto\": what a user "
                "gets without set_backend)", "bnkernels", backend="auto")

# Which provider each speedup column compares against: speedup_vs_<key> = t(that) / t(row).
COMPILE_BASELINE = _CompileBaseline()
for _op in OPS:
    COMPILE_BASELINE[_op] = COMPILE_BASELINE[_op]  # the built-in ops listed (the report's)
BNKERNELS = ("bnkernels-triton", "bnkernels-cuda")  # the fast paths (not the reference)
# The overhead section's: Triton through its JIT on every launch (what the direct launch
# path saves, measured beside bnkernels-triton).
TRITON_JIT = Provider("bnkernels-triton-jit", "bnkernels with the triton backend, every launch "
                      "through Triton's JIT (kernel[grid]) instead of the direct launch path",
                      "bnkernels", backend="triton", default_on_cpu=False,
                      jit_launch=True)


def default_providers(device: torch.device) -> list[str]:
    on_cpu = device.type == "cpu"
    return [n for n, p in PROVIDERS.items() if (p.default_on_cpu if on_cpu else p.default_on_cuda)]


def not_default_reason(name: str, device: torch.device) -> str:
    """Why a provider is left out of a run on ``device`` unless asked for by name."""
    p = PROVIDERS[name]
    if device.type == "cpu" and p.compiled:
        return ("torch.compile is not run with --device cpu unless asked (--providers): "
                "compiling takes ~20 s per graph on a CPU")
    if device.type == "cpu" and name == "bnkernels-cuda":
        return "the CUDA backend needs a CUDA device"
    if device.type == "cuda" and name == "bnkernels-reference":
        return "the eager oracle is benchmarked on a GPU only when asked (--providers)"
    return "not in the default provider list for this device"


def first_line(e: BaseException) -> str:
    """An exception as one short line, for skip lists."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- inputs and passes


@dataclass
class Inputs:
    """The tensors of one (shape, dtype, layout): x and dy in x's dtype and memory format;
    running statistics, weight and bias fp32 with requires_grad on weight and bias."""

    x: torch.Tensor
    dy: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor  # running_scale for l_p
    weight: torch.Tensor
    bias: torch.Tensor
    initial_stats: tuple[torch.Tensor, torch.Tensor]  # the running buffers before any pass

    def fresh_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the running buffers as made (timed passes update the live ones)."""
        return self.initial_stats[0].clone(), self.initial_stats[1].clone()


def make_inputs(dims: tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format,
                device: torch.device, seed: int = 0) -> Inputs:
    """Seeded inputs generated on the device: x ~ N(0.25, 1.5^2) (a non-trivial mean), dy ~
    N(0, 1), running_var and the l_p scale ~ U(0.5, 1.5), weight ~ 1 + 0.1 N, bias ~ 0.1 N."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    c = dims[1]
    x = torch.empty(dims, dtype=dtype, device=device, memory_format=memory_format)
    x.normal_(0.25, 1.5, generator=gen)
    dy = torch.empty_like(x).normal_(generator=gen)
    f32 = dict(dtype=torch.float32, device=device)
    rm = 0.1 * torch.randn(c, generator=gen, **f32)
    rv = 0.5 + torch.rand(c, generator=gen, **f32)
    w = (1 + 0.1 * torch.randn(c, generator=gen, **f32)).requires_grad_()
    b = (0.1 * torch.randn(c, generator=gen, **f32)).requires_grad_()
    return Inputs(x, dy, rm, rv, w, b, (rm.clone(), rv.clone()))


def pass_builder(pass_: str, f: Forward, inp: Inputs) -> Callable[[], Callable[[], object]]:
    """A builder of the zero-argument callable that runs ``pass_`` once.

    fwd-train / fwd-eval: the forward under no_grad (training updates the running
    statistics). bwd: the forward runs once when built; the callable is the backward alone
    (``autograd.grad(..., retain_graph=True)`` of x, weight and bias). fwd+bwd: forward and
    backward, as in a training step.
    """
    x, rm, rv, w, b, dy = inp.x, inp.running_mean, inp.running_var, inp.weight, inp.bias, inp.dy

    def build():
        if pass_ in ("fwd-train", "fwd-eval"):
            training = pass_ == "fwd-train"

            def run():
                with torch.no_grad():
                    return f(x, rm, rv, w, b, training)
            return run
        xg = x.detach().requires_grad_()
        leaves = (xg, w, b)
        if pass_ == "bwd":
            y = f(xg, rm, rv, w, b, True)
            return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
        if pass_ == "fwd+bwd":
            return lambda: torch.autograd.grad(f(xg, rm, rv, w, b, True), leaves, dy)
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    return build


# ----------------------------------------------------------------------------- correctness


# max |y - y_ref| / max(1, max |y_ref|) accepted for a forward output, per input dtype.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3.2e-2,
             torch.float64: 1e-10}


def oracle(op: str, p: str | None, inp: Inputs, training: bool) -> torch.Tensor | None:
    """The forward output for ``op`` on these inputs (fresh running statistics), computed in
    fp64 and kept in fp32 (half the memory, far below every tolerance), or None where outputs
    are not comparable across providers (noisy BN: each draws its own noise). BatchNorm:
    PyTorch itself; l_p: bnkernels' reference formulas."""
    make = bench_op(op)[1].oracle
    if make is None:
        return None
    rm, rv = (t.double() for t in inp.fresh_stats())
    w, b = inp.weight.detach().double(), inp.bias.detach().double()
    with torch.no_grad():
        return resolve(make)(p)(inp.x.double(), rm, rv, w, b, training).float()


def max_error(f: Forward, inp: Inputs, training: bool, expected: torch.Tensor) -> float:
    """max |f(x) - expected| / max(1, max |expected|), with fresh running statistics."""
    rm, rv = inp.fresh_stats()
    with torch.no_grad():
        y = f(inp.x, rm, rv, inp.weight, inp.bias, training)
        scale = max(1.0, float(expected.abs().max()))
        return float((y.float() - expected).abs().max()) / scale


__all__ = ["AUTO", "BNKERNELS", "CHECK_TOL", "COMPILE_BASELINE", "EPS", "LP_PS", "MOMENTUM",
           "TRITON_JIT", "NOISE", "OPS", "PASSES", "PROVIDERS", "TRAFFIC", "Inputs", "Provider",
           "batch_norm_eager", "batch_norm_oracle", "bnkernels_batch_norm", "bnkernels_lp_norm",
           "bnkernels_noisy_batch_norm", "default_providers", "first_line", "lp_norm_eager",
           "lp_norm_eager_of", "lp_norm_oracle", "make_inputs", "max_error",
           "noisy_batch_norm_eager", "noisy_batch_norm_eager_of", "not_default_reason", "ops",
           "oracle", "pass_builder"]
