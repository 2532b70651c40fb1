"""Functional ops, ``torch.nn.functional``-style.

The hot path. A call looks its input signature up in a cache (shape, strides, dtype and device
of the input and of the per-channel tensors, and the call's flags); only the first call of a
signature validates it, selects the backend and makes the backend's plan (layout, strategy,
grids, workspace). Later calls check the two scalars (momentum, eps) and go straight to the
plan, through a plain autograd Function when a gradient is wanted, or to the plan alone when
none is. No environment, import system, filesystem or device query is touched per call.

Under torch.compile, export, fake tensors or a dispatch mode (FlopCounterMode, make_fx, ...),
calls take the traced route instead: the same validation, then the registered torch ops
(``bnkernels::batch_norm``, ...), which compilers and modes can see (see :mod:`.ops`).
"""

from __future__ import annotations

import math

import torch

from . import backends
from .backends._base import FLOAT_DTYPES, Signature
from .noise import NoiseConfig
from .ops import BatchNormFunction, BatchNormOpFunction, LpNormFunction, LpNormOpFunction

ACTIVATIONS = (None, "relu")

# ----------------------------------------------------------------------------- routing

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _eager(x) -> bool:
    """True for a plain tensor outside compilers and dispatch modes: the direct route."""
    return not _is_compiling() and type(x) in _PLAIN_TENSORS and _dispatch_modes() == 0


def _chan(t):
    """The cache key of a per-channel tensor (None allowed)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))


def _scalars_ok(momentum, eps) -> bool:
    return (momentum is not None and 0.0 <= momentum <= 1.0
            and 0.0 < eps < math.inf)


_EMPTY = "empty"  # the plan of an empty batch: no kernel
_BN_PLANS: dict = backends.register_plan_cache({})
_LP_PLANS: dict = backends.register_plan_cache({})


def _check_input(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{op}: expected an input of shape (N, C, *spatial) with 2 or more dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: unsupported input dtype {x.dtype}; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")


def _check_per_channel(op: str, x: torch.Tensor, **tensors) -> None:
    C = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the input is on {x.device}; "
                "all tensors must be on the same device")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() != C:
            raise ValueError(
                f"{op}: {name} should contain {C} elements (one per channel of the input, "
                f"shape {tuple(x.shape)}), not {t.numel()}")


def _check_training_size(x: torch.Tensor) -> None:
    """As PyTorch: statistics of a single value per channel are meaningless."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _check_scalars(op: str, momentum, eps, activation) -> None:
    if momentum is None:
        raise ValueError(
            f"{op}: momentum=None (cumulative moving average) needs the number of batches seen; "
            "the modules (bnkernels.BatchNorm2d, ...) track it, or pass "
            "momentum=1/num_batches yourself")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    if not 0.0 < float(eps) < math.inf:  # comparisons only: eps may be symbolic in a graph
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    Normalizes each channel of ``x`` (N, C, *spatial) over N and the spatial dims. In training
    the batch statistics are used and, if given, ``running_mean``/``running_var`` are updated in
    place (unbiased variance, ``momentum`` as in PyTorch); in eval mode the running statistics
    are used. ``activation="relu"`` fuses a ReLU on the output. Statistics are accumulated in
    fp32 (fp64 for fp64 input); the output has x's dtype and memory format.
    """
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, None)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                noise):
    """batch_norm and noisy_batch_norm (``noise`` = (NoiseConfig, seed, step) or None)."""
    if not _eager(x):
        return _batch_norm_traced(x, running_mean, running_var, weight, bias, training,
                                  momentum, eps, activation, noise)
    try:
        key = (x.shape, x.stride(), x.dtype, x.device, training, activation,
               _chan(running_mean), _chan(running_var), _chan(weight), _chan(bias),
               None if noise is None else isinstance(noise[2], torch.Tensor))
        plan = _BN_PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors: validation below says what is wrong
        key, plan = None, None
    if plan is None:
        plan = _batch_norm_plan(key, x, running_mean, running_var, weight, bias, training,
                                momentum, eps, activation, noise)
    if not _scalars_ok(momentum, eps):
        _check_scalars("noisy_batch_norm" if noise else "batch_norm", momentum, eps, activation)
    if plan is _EMPTY:
        return _empty_batch(x, weight, bias, activation)
    momentum, eps = float(momentum), float(eps)
    if _needs_grad(x, weight, bias):
        y = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, plan, momentum,
                                    eps, noise)
    else:
        y = plan.forward(x, running_mean, running_var, weight, bias, momentum, eps, noise,
                         need_saved=False)[0]
    return y


def _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, activation):
    _check_input(op, x)
    _check_per_channel(op, x, running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    _check_scalars(op, momentum, eps, activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var must be given in eval mode "
                         "(training=False)")
    if training:
        _check_training_size(x)


def _batch_norm_plan(key, x, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation, noise):
    """Validate a new signature and make (and cache) its plan."""
    op = "noisy_batch_norm" if noise is not None else "batch_norm"
    _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, activation)
    if x.numel() == 0:
        plan = _EMPTY
    else:
        plan = _ChannelsCopied.wrap(backends.plan(op, x, Signature.of(
            x, bool(training), activation=activation, has_weight=weight is not None,
            has_bias=bias is not None, has_running=running_mean is not None,
            noisy=noise is not None,
            step_tensor=noise is not None and isinstance(noise[2], torch.Tensor))),
            running_mean, running_var, weight, bias)
    if key is not None:
        backends._base.bounded_cache_put(_BN_PLANS, key, plan)
    return plan


class _ChannelsCopied:
    """A plan for per-channel tensors that are not contiguous (the kernels read them as
    contiguous vectors): contiguous copies go in, and updated running buffers are copied back.
    Rare (a view such as ``w[::2]``), so it stays off the common path."""

    def __init__(self, plan):
        self.plan = plan

    @staticmethod
    def wrap(plan, *tensors):
        if all(t is None or t.is_contiguous() for t in tensors):
            return plan
        return _ChannelsCopied(plan)

    def forward(self, x, running_mean, running_var, weight, bias, *args, **kwargs):
        c = [t if t is None else t.contiguous() for t in (running_mean, running_var)]
        out = self.plan.forward(x, c[0], c[1], weight if weight is None else weight.contiguous(),
                                bias if bias is None else bias.contiguous(), *args, **kwargs)
        for orig, copy in zip((running_mean, running_var), c):
            if orig is not None and copy is not orig:
                orig.copy_(copy)
        return out

    def backward(self, dy, x, a, b, weight, bias, *args):
        a, b = a.contiguous(), b.contiguous()
        return self.plan.backward(dy, x, a, b, weight if weight is None else weight.contiguous(),
                                  bias if bias is None else bias.contiguous(), *args)


def _batch_norm_traced(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, noise):
    """The traced route: the registered ops, through BatchNormOpFunction."""
    op = "noisy_batch_norm" if noise is not None else "batch_norm"
    _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, activation)
    if x.numel() == 0:
        return _empty_batch(x, weight, bias, activation)
    name = backends.backend_name_for_compile(op, str(x.device), str(x.dtype).replace("torch.", ""),
                                             backends.GENERATION)
    if noise is None:
        return BatchNormOpFunction.apply(x, weight, bias, running_mean, running_var,
                                         bool(training), float(momentum), float(eps),
                                         activation, None, 0, 0, None, name)
    cfg, seed, step = noise
    step_tensor = step if isinstance(step, torch.Tensor) else None
    return BatchNormOpFunction.apply(x, weight, bias, running_mean, running_var, True,
                                     float(momentum), float(eps), activation, cfg.as_list(),
                                     seed, 0 if step_tensor is not None else step, step_tensor,
                                     name)


def _check_noise(op, x, noise, seed, step):
    if not isinstance(noise, NoiseConfig):
        raise TypeError(f"{op}: noise must be a bnkernels.NoiseConfig, got {type(noise).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_floating_point() or step.is_complex():
            raise ValueError(f"{op}: a step tensor must hold one integer, got {step.dtype} "
                             f"of shape {tuple(step.shape)}")
        if step.device != x.device:
            raise ValueError(f"{op}: step is on {step.device} but the input is on {x.device}")
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{op}: step must be an int >= 0 or a 1-element integer tensor, "
                         f"got {step!r}")


def noisy_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5,
                     noise: NoiseConfig = NoiseConfig(), seed: int = 0,
                     step: int | torch.Tensor = 0, activation: str | None = None) -> torch.Tensor:
    """BatchNorm with the paper's time-varying noise (Algorithm 1): out = act(s * a + m).

    ``a`` is the BatchNorm output after the affine weight/bias; (s, m) is drawn per channel
    and per element from ``noise`` (see :class:`NoiseConfig`) by a counter-based RNG keyed by
    ``seed``, ``step`` and the element's (N, C, *spatial) index: the same (seed, step) gives the
    same noise on every backend call and in backward, which regenerates it instead of storing
    it. ``step`` may be an int or a 1-element integer tensor on x's device (read on device: no
    host synchronisation, so it works under CUDA graphs). In eval mode there is no random
    noise: the output is its expectation given the statistics, act(E[s] a + E[m]) with the
    running statistics (:meth:`NoiseConfig.expectation`; E[s] = 1.125, E[m] = 0 at the paper's
    constants). Plain BatchNorm in eval (dropping E[s]) would feed every later layer inputs
    ~1.125x smaller than the ones its running statistics were gathered on in training; on a
    quick VGG that took test accuracy from ~99% to ~20%.
    """
    _check_noise("noisy_batch_norm", x, noise, seed, step)
    if not training:
        weight, bias = expected_noise_affine(noise, weight, bias, x)
        return batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps,
                          activation)
    return _batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps,
                       activation, (noise, seed, step))


def expected_noise_affine(noise: NoiseConfig, weight, bias, x):
    """(weight, bias) of the affine a -> E[s] (w xhat + b) + E[m]: BatchNorm with these is noisy
    BatchNorm's expectation over the noise (eval mode). Differentiable in weight and bias."""
    es, em = noise.expectation()
    C = x.shape[1]
    if weight is None:
        weight = torch.full((C,), es, device=x.device, dtype=_param_dtype(x))
    else:
        weight = weight * es
    if bias is None:
        bias = torch.full((C,), em, device=x.device, dtype=_param_dtype(x))
    else:
        bias = bias * es + em
    return weight, bias


def _param_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def noisy_batch_norm_noise(x: torch.Tensor, noise: NoiseConfig = NoiseConfig(), seed: int = 0,
                           step: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise ``(s, m)`` that :func:`noisy_batch_norm` applies to ``x`` in training at
    (seed, step): fp32 tensors of x's shape, such that out = act(s * a + m).

    For tests, and for plotting the noise. Backends agree on the bits of the uniforms; the
    normals agree to rounding of log/cos."""
    op = "noisy_batch_norm_noise"
    _check_input(op, x)
    _check_noise(op, x, noise, seed, step)
    return backends.select(op, x).noisy_batch_norm_noise(x, (noise, seed, step))


def _empty_batch(x, weight, bias, activation):
    """As PyTorch: an empty batch gives an empty output, statistics untouched, and (zero)
    gradients still reach weight and bias."""
    out = x.clone()
    if weight is not None:
        out = out * weight.reshape(1, -1, *([1] * (x.dim() - 2)))
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return torch.relu(out) if activation == "relu" else out


LP_NORMS = (1, 2, math.inf)


def _check_p(op: str, p):
    """p as 1, 2 or math.inf; accepts 1, 2, float('inf') and the strings "1", "2", "inf"."""
    if isinstance(p, str):
        value = {"1": 1, "2": 2, "inf": math.inf}.get(p)
    elif isinstance(p, (int, float)) and not isinstance(p, bool) and p in LP_NORMS:
        value = LP_NORMS[LP_NORMS.index(p)]
    else:
        value = None
    if value is None:
        raise ValueError(f"{op}: p must be one of 1, 2, inf (or the strings '1', '2', 'inf'), "
                         f"got p={p!r}")
    return value


def lp_norm(x: torch.Tensor, p, running_mean: torch.Tensor | None = None,
            running_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
            eps: float = 1e-5, centered: bool = False) -> torch.Tensor:
    """l_p normalization (p in {1, 2, inf}): ``y = weight * (x - mean) / (s_p + eps) + bias``.

    Per channel of ``x`` (N, C, *spatial), over N and the spatial dims: mean = mean(x) and
    s_1 = mean|z|, s_2 = sqrt(mean z^2), s_inf = max|z|, where z = x ("before shifting the
    mean", the default) or z = x - mean (``centered=True``). In training the batch statistics
    are used and, if given, ``running_mean``/``running_scale`` are updated in place:
    r <- momentum * batch + (1 - momentum) * r (no unbiasing of the scale). In eval mode the
    running statistics are used (and required), as constants. The gradient of the l_inf scale
    is split equally among the values attaining max|z| (as torch.amax's). Statistics are
    accumulated in fp32 (fp64 for fp64 input); the output has x's dtype and memory format.
    """
    if not _eager(x):
        return _lp_norm_traced(x, p, running_mean, running_scale, weight, bias, training,
                               momentum, eps, centered)
    try:
        key = (x.shape, x.stride(), x.dtype, x.device, p, training, centered,
               _chan(running_mean), _chan(running_scale), _chan(weight), _chan(bias))
        plan = _LP_PLANS.get(key)
    except (AttributeError, TypeError):
        key, plan = None, None
    if plan is None:
        plan = _lp_norm_plan(key, x, p, running_mean, running_scale, weight, bias, training,
                             momentum, eps, centered)
    if not _scalars_ok(momentum, eps):
        _check_scalars("lp_norm", momentum, eps, None)
    if plan is _EMPTY:
        return _empty_batch(x, weight, bias, None)
    momentum, eps = float(momentum), float(eps)
    if _needs_grad(x, weight, bias):
        y = LpNormFunction.apply(x, weight, bias, running_mean, running_scale, plan, momentum,
                                 eps)
    else:
        y = plan.forward(x, running_mean, running_scale, weight, bias, momentum, eps,
                         need_saved=False)[0]
    return y


def _validate_lp_norm(op, x, p, running_mean, running_scale, weight, bias, training, momentum,
                      eps):
    _check_input(op, x)
    p = _check_p(op, p)
    _check_per_channel(op, x, running_mean=running_mean, running_scale=running_scale,
                       weight=weight, bias=bias)
    _check_scalars(op, momentum, eps, None)
    if (running_mean is None) != (running_scale is None):
        raise ValueError(f"{op}: pass both running_mean and running_scale, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_scale must be given in eval mode "
                         "(training=False)")
    if training:
        _check_training_size(x)
    return p


def _lp_norm_plan(key, x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                  centered):
    p = _validate_lp_norm("lp_norm", x, p, running_mean, running_scale, weight, bias, training,
                          momentum, eps)
    if x.numel() == 0:
        plan = _EMPTY
    else:
        plan = _ChannelsCopied.wrap(backends.plan("lp_norm", x, Signature.of(
            x, bool(training), has_weight=weight is not None, has_bias=bias is not None,
            has_running=running_mean is not None, p=p, centered=bool(centered))),
            running_mean, running_scale, weight, bias)
    if key is not None:
        backends._base.bounded_cache_put(_LP_PLANS, key, plan)
    return plan


def _lp_norm_traced(x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                    centered):
    p = _validate_lp_norm("lp_norm", x, p, running_mean, running_scale, weight, bias, training,
                          momentum, eps)
    if x.numel() == 0:
        return _empty_batch(x, weight, bias, None)
    name = backends.backend_name_for_compile("lp_norm", str(x.device),
                                             str(x.dtype).replace("torch.", ""),
                                             backends.GENERATION)
    return LpNormOpFunction.apply(x, weight, bias, running_mean, running_scale, p,
                                  bool(training), float(momentum), float(eps), bool(centered),
                                  name)
