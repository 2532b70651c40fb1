"""Functional ops, ``torch.nn.functional``-style: batch_norm, noisy_batch_norm, lp_norm.

The hot path. A call builds its :class:`~.backends.plan.Signature` (shape, strides, dtype and
device of the input and of the per-channel tensors, and the call's flags) and looks its plan
up in :data:`~.backends.plan.PLANS`; only the first call of a signature validates it, selects
the backend and makes the plan (:func:`_batch_norm_plan`, :func:`_lp_norm_plan`: the cold
path). Later calls check the two scalars (momentum, eps) and go straight to the plan, through
:class:`~.autograd.NormFunction` when a gradient is wanted, or to the plan alone when none
is. No environment, import system, filesystem or device query is touched per call.

Under torch.compile, export, fake tensors or a dispatch mode (FlopCounterMode, make_fx, ...),
calls take the traced route instead: the same validation, then the same autograd Function on
an :class:`~.library.OpPlan`, which calls the registered torch ops (``bnkernels::batch_norm``,
...) that compilers and modes can see.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from .autograd import NormFunction
from .backends.plan import FLOAT_DTYPES, PLANS, Call, Signature, signature, step_entry
from .errors import ValidationError, ValidationTypeError
from .families import BATCH_NORM, LP_NORM, family_of
from .noise import NoiseConfig

ACTIVATIONS = (None, "relu")
LP_NORMS = (1, 2, math.inf)
_P = {1: 1, 2: 2, math.inf: math.inf, "1": 1, "2": 2, "inf": math.inf}  # accepted spellings
_INF = math.inf

# ----------------------------------------------------------------------------- routing

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_grad_enabled = torch.is_grad_enabled
_new = tuple.__new__  # a NamedTuple from a plain tuple, without NamedTuple's __new__
_signature = signature
_plan_get = PLANS.get  # PLANS is cleared in place, never replaced
_channels = Signature.channels_of
_step_entry = step_entry
_SEED_END = 2**63


_PLAIN = (Tensor, torch.nn.Parameter)


class _Empty:
    """The plan of an empty batch: no kernel (see :func:`_empty_batch`)."""


_EMPTY = _Empty()


def _check_input(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValidationTypeError(f"{op}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValidationError(
            f"{op}: expected an input of shape (N, C, *spatial) with 2 or more dims, "
            f"got {x.dim()}D input of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValidationTypeError(
            f"{op}: unsupported input dtype {x.dtype}; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)} (convert the input, e.g. x.float())")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_tensor_beside(op: str, name: str, t, x: torch.Tensor, move: str) -> None:
    """``t`` (not None) is a tensor on x's device; ``move`` says how to put it there."""
    if not isinstance(t, torch.Tensor):
        raise ValidationTypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise ValidationError(
            f"{op}: {name} is on {t.device} but the input is on {x.device}; all tensors must be "
            f"on the same device ({move})")


def _check_per_channel(op: str, x: torch.Tensor, **tensors) -> None:
    """Per-channel tensors: on x's device, one element per channel, and, as torch's BatchNorm
    requires, all of one floating dtype: x's, or float32 for a float16/bfloat16 x (mixed
    precision). Running buffers of another dtype would be updated with a silent rounding (or
    widening) torch does not do; the error says how to convert them."""
    C = x.shape[1]
    first = None  # (name, dtype) of the first per-channel tensor given
    for name, t in tensors.items():
        if t is None:
            continue
        _check_tensor_beside(op, name, t, x, f"move it with {name}.to(x.device), or the module "
                             "with module.to(device)")
        if not t.is_floating_point():
            raise ValidationTypeError(
                f"{op}: {name} must be a floating-point tensor, got {t.dtype} "
                f"(convert it, e.g. {name}.float())")
        if t.numel() != C:
            raise ValidationError(
                f"{op}: {name} should contain {C} elements (one per channel of the input, "
                f"shape {tuple(x.shape)}), not {t.numel()}")
        allowed = (x.dtype, torch.float32) if x.dtype in _LOW_PRECISION else (x.dtype,)
        if t.dtype not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValidationTypeError(
                f"{op}: {name} is {t.dtype} but the input is {x.dtype}; weight, bias and the "
                f"running statistics must be {want} (float32 parameters only with a float16 or "
                f"bfloat16 input): convert with {name}.to({x.dtype}), or the module and its "
                "input to one dtype (module.to(dtype))")
        if first is None:
            first = (name, t.dtype)
        elif t.dtype != first[1]:
            raise ValidationTypeError(
                f"{op}: {name} is {t.dtype} but {first[0]} is {first[1]}; weight, bias and the "
                f"running statistics must share one dtype: convert with "
                f"{name}.to({first[1]}) (or module.to(dtype))")


def _check_training_size(x: torch.Tensor, op: str = "batch_norm") -> None:
    """As PyTorch: statistics of a single value per channel are meaningless."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValidationError(
            f"Expected more than 1 value per channel when training, got input size {x.size()} "
            f"({op}: the batch statistics of one value per channel are undefined; train on a "
            "batch with N * prod(spatial) >= 2, or use eval mode (training=False, "
            "module.eval()) with running statistics)")


def _check_residual(op: str, x: torch.Tensor, residual) -> None:
    """A residual is added to the normalized x before the activation: a tensor of x's shape,
    dtype and device (any strides)."""
    if residual is None:
        return
    _check_tensor_beside(op, "residual", residual, x, "move it with residual.to(x.device)")
    if residual.shape != x.shape:
        raise ValidationError(
            f"{op}: residual has shape {tuple(residual.shape)} but the input has shape "
            f"{tuple(x.shape)}; the residual is added elementwise to the normalized input and "
            "must have its shape (no broadcasting)")
    if residual.dtype != x.dtype:
        raise ValidationTypeError(
            f"{op}: residual is {residual.dtype} but the input is {x.dtype}; convert it with "
            f"residual.to({x.dtype})")


def _check_scalars(op: str, momentum, eps, activation=None) -> None:
    if momentum is None:
        raise ValidationError(
            f"{op}: momentum=None (cumulative moving average) needs the number of batches seen; "
            "the modules (bnkernels.BatchNorm2d, ...) track it, or pass "
            "momentum=1/num_batches yourself")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValidationError(f"{op}: momentum must be in [0, 1], got {momentum}")
    if not 0.0 < float(eps) < math.inf:  # comparisons only: eps may be symbolic in a graph
        raise ValidationError(f"{op}: eps must be a positive finite number, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValidationError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- BatchNorm


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    Normalizes each channel of ``input`` (N, C, *spatial) over N and the spatial dims. In
    training the batch statistics are used and, if given, ``running_mean``/``running_var`` are
    updated in place (unbiased variance, ``momentum`` as in PyTorch); in eval mode the running
    statistics are used. ``activation="relu"`` fuses a ReLU on the output. ``residual`` (a
    tensor of the input's shape, dtype and device, any strides) is added before the
    activation, in the same pass: the output is ``act(bn(input) + residual)``, and
    d(residual) comes from the backward's passes. Statistics are accumulated in fp32 (fp64
    for fp64 input); the output has the input's dtype and memory format. The arguments are
    ``torch.nn.functional.batch_norm``'s, in its order, plus ``activation`` and ``residual``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, None, None, residual)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                noise, counter, residual=None):
    """batch_norm and noisy_batch_norm. ``noise``: (NoiseConfig, seed, step) or None.
    ``counter``: a module's num_batches_tracked, incremented by the call (or None).
    ``residual``: added before the activation (or None)."""
    if type(x) not in _PLAIN or _is_compiling() or _dispatch_modes():
        return _batch_norm_traced(x, running_mean, running_var, weight, bias, training,
                                  momentum, eps, activation, noise, counter, residual)
    try:
        sig = _signature("batch_norm", x, training, activation,
                         None if noise is None else (noise[0], _step_entry(noise[2])), None,
                         None, counter is not None,
                         _channels(weight, bias, running_mean, running_var),
                         None if residual is None else (residual.dtype, residual.device,
                                                        residual.shape))
        plan = _plan_get(sig) or _batch_norm_plan(sig, x, running_mean, running_var, weight,
                                                   bias, training, momentum, eps, activation,
                                                   noise, residual)
        momentum, eps = float(momentum), float(eps)
    except (AttributeError, TypeError, ValueError):  # validation says what is wrong
        _validate_batch_norm(_bn_name(noise), x, running_mean, running_var, weight, bias,
                             training, momentum, eps, activation, residual=residual)
        raise
    if not (0.0 <= momentum <= 1.0 and 0.0 < eps < _INF):
        _check_scalars(_bn_name(noise), momentum, eps, activation)
    if residual is not None:
        return _run_residual(plan, x, running_mean, running_var, weight, bias, momentum, eps,
                             noise, counter, residual, activation)
    return _run(plan, x, running_mean, running_var, weight, bias, momentum, eps, noise, counter)


def _run(plan, x, running_mean, running_var, weight, bias, momentum, eps, noise, counter):
    """The plan's forward: through the autograd Function when a gradient is wanted (the
    scalars are checked floats)."""
    if plan is _EMPTY:
        return _empty_batch(x, weight, bias, None, counter)  # no values: no activation
    if _grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        # a Call's fields, in order, as a plain tuple: nothing is built for the structure
        return NormFunction.apply(x, weight, bias, (running_mean, running_var, plan, momentum,
                                                    eps, noise, counter))
    return plan.forward(x, weight, bias, (running_mean, running_var, plan, momentum, eps, noise,
                                          counter), False)[0]


def _run_residual(plan, x, running_mean, running_var, weight, bias, momentum, eps, noise,
                  counter, residual, activation):
    """:func:`_run` with a residual (a fourth differentiable input of the autograd Function)."""
    if plan is _EMPTY:
        return _empty_batch(x, weight, bias, activation, counter, residual)
    if _grad_enabled() and (x.requires_grad or residual.requires_grad
                            or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        return NormFunction.apply(x, weight, bias, (
            running_mean, running_var, plan, momentum, eps, noise, counter), residual)
    return plan.forward(x, weight, bias, (running_mean, running_var, plan, momentum, eps, noise,
                                          counter), False, residual)[0]


def _bn_name(noise):
    return "noisy_batch_norm" if noise is not None else "batch_norm"


def _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, activation, running=BATCH_NORM.running, residual=None):
    """Everything about a call that its signature's first call checks (``running``: the names
    of the family's running buffers, e.g. running_scale for l_p; a family may have only
    running_mean)."""
    _check_input(op, x)
    _check_residual(op, x, residual)
    _check_per_channel(op, x, **dict(zip(running, (running_mean, running_var))),
                       weight=weight, bias=bias)
    _check_scalars(op, momentum, eps, activation)
    if len(running) == 1:
        if running_var is not None:
            raise ValidationError(f"{op}: takes one running buffer ({running[0]}), got a "
                                  "second")
    elif (running_mean is None) != (running_var is None):
        raise ValidationError(f"{op}: pass both running_mean and {running[1]}, or neither")
    if not training and running_mean is None:
        raise ValidationError(f"{op}: {' and '.join(running)} must be given in eval mode "
                              "(training=False)")
    if training:
        _check_training_size(x, op)


def _batch_norm_plan(sig, x, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation, noise, residual=None):
    """The cold path: validate a new signature, make its plan and cache it."""
    _validate_batch_norm(_bn_name(noise), x, running_mean, running_var, weight, bias, training,
                         momentum, eps, activation, residual=residual)
    if noise is not None and isinstance(noise[2], Tensor):
        _check_step_tensor("noisy_batch_norm", x, noise[2])
    if x.numel() == 0:
        return PLANS.put(sig, _EMPTY)
    return backends.make_plan(sig, x)


def _batch_norm_traced(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, noise, counter, residual=None):
    """The traced route: the same validation, then the registered ops (an OpPlan)."""
    op = _bn_name(noise)
    _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, activation, residual=residual)
    if x.numel() == 0:
        return _empty_batch(x, weight, bias, activation, counter, residual)
    name = backends.backend_name_for_compile(
        op if residual is None else op + backends.RESIDUAL, str(x.device),
        str(x.dtype).replace("torch.", ""), backends.GENERATION)
    plan = BATCH_NORM.op_plan("batch_norm", training, activation, None, None, name,
                              residual=residual is not None)
    call = Call(running_mean, running_var, plan, float(momentum), float(eps), noise, counter)
    if residual is not None:
        return NormFunction.apply(x, weight, bias, call, residual)
    return NormFunction.apply(x, weight, bias, call)


def sync_plan(x, running_mean, running_var, weight, bias, activation, backend=None):
    """The BatchNorm plan whose stages a SyncBatchNorm training call runs, from the cache
    (validated when its signature is new; ``backend``: the one a traced graph fixed)."""
    sig = Signature.of("batch_norm", x, True, activation=activation, weight=weight, bias=bias,
                       running_mean=running_mean, running_var=running_var, backend=backend)
    plan = PLANS.get(sig)
    if plan is None:
        _validate_batch_norm("batch_norm", x, running_mean, running_var, weight, bias, True, 0.1,
                             1e-5, activation)
        plan = backends.make_plan(sig, x)
    return plan


# ----------------------------------------------------------------------------- noisy BatchNorm


def _check_noise(op, x, noise, seed, step):
    """The noise arguments of a call. Per call only the cheap part: a step tensor's dtype,
    size and device are part of the signature, checked on its first call
    (:func:`_check_step_tensor`)."""
    if (type(noise) is NoiseConfig and type(seed) is int and 0 <= seed < _SEED_END
            and ((type(step) is int and step >= 0) or isinstance(step, Tensor))):
        return
    if not isinstance(noise, NoiseConfig):
        raise ValidationTypeError(
            f"{op}: noise must be a bnkernels.NoiseConfig, got {type(noise).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValidationError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(step, torch.Tensor):
        _check_step_tensor(op, x, step)
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValidationError(f"{op}: step must be an int >= 0 or a 1-element integer tensor, "
                              f"got {step!r}")


def _check_step_tensor(op, x, step):
    if step.numel() != 1 or step.is_floating_point() or step.is_complex():
        raise ValidationError(f"{op}: a step tensor must hold one integer, got {step.dtype} "
                              f"of shape {tuple(step.shape)}")
    if step.device != x.device:
        raise ValidationError(f"{op}: step is on {step.device} but the input is on {x.device}")


def noisy_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5,
                     noise: NoiseConfig = NoiseConfig(), seed: int = 0,
                     step: int | torch.Tensor = 0, activation: str | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm with the paper's time-varying noise (Algorithm 1): out = act(s * a + m).

    ``a`` is the BatchNorm output after the affine weight/bias; (s, m) is drawn per channel
    and per element from ``noise`` (see :class:`NoiseConfig`) by a counter-based RNG keyed by
    ``seed``, ``step`` and the element's (N, C, *spatial) index: the same (seed, step) gives the
    same noise on every backend call and in backward, which regenerates it instead of storing
    it. ``step`` may be an int or a 1-element integer tensor on the input's device (read on
    device: no host synchronisation, so it works under CUDA graphs). In eval mode there is no
    random noise: the output is its expectation given the statistics, act(E[s] a + E[m]) with the
    running statistics (:meth:`NoiseConfig.expectation`; E[s] = 1.125, E[m] = 0 at the paper's
    constants). ``residual``: added before the activation, act(s * a + m + residual), as
    :func:`batch_norm`'s. Plain BatchNorm in eval (dropping E[s]) would feed every later layer
    inputs ~1.125x smaller than the ones its running statistics were gathered on in training; on
    the quick reproduction's VGG that took test accuracy from 97.8% to 40.1% (median of 3 seeds).
    """
    _check_noise("noisy_batch_norm", input, noise, seed, step)
    if not training:
        weight, bias = expected_noise_affine(noise, weight, bias, input, running_mean)
        return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                           activation, None, None, residual)
    return _batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                       activation, (noise, seed, step), None, residual)


def expected_noise_affine(noise: NoiseConfig, weight, bias, x, running_mean=None):
    """(weight, bias) of the affine a -> E[s] (w xhat + b) + E[m]: BatchNorm with these is noisy
    BatchNorm's expectation over the noise (eval mode). Differentiable in weight and bias. A
    missing weight or bias is made in the dtype of the per-channel tensors given (the other
    one, or ``running_mean``), so all of them keep one dtype."""
    es, em = noise.expectation()
    C = x.shape[1]
    dtype = _param_dtype(x, weight, bias, running_mean)
    if weight is None:
        weight = torch.full((C,), es, device=x.device, dtype=dtype)
    else:
        weight = weight * es
    if bias is None:
        bias = torch.full((C,), em, device=x.device, dtype=dtype)
    else:
        bias = bias * es + em
    return weight, bias


def _param_dtype(x, *like):
    """The dtype of the first floating tensor in ``like``, else fp64 for fp64 x, else fp32."""
    for t in like:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
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
    return backends.select(op, x).noise(x, (noise, seed, step))


def _empty_batch(x, weight, bias, activation, counter=None, residual=None):
    """As PyTorch: an empty batch gives an empty output, statistics untouched (the module's
    batch counter still advances), and (zero) gradients still reach weight and bias."""
    if counter is not None:
        counter.add_(1)
    out = x.clone()
    if weight is not None:
        out = out * weight.reshape(1, -1, *([1] * (x.dim() - 2)))
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if activation == "relu" else out


# ----------------------------------------------------------------------------- l_p norm


def _check_p(op: str, p):
    """p as 1, 2 or math.inf; accepts 1, 2, float('inf') and the strings "1", "2", "inf"."""
    if isinstance(p, str):
        value = {"1": 1, "2": 2, "inf": math.inf}.get(p)
    elif isinstance(p, (int, float)) and not isinstance(p, bool) and p in LP_NORMS:
        value = LP_NORMS[LP_NORMS.index(p)]
    else:
        value = None
    if value is None:
        raise ValidationError(f"{op}: p must be one of 1, 2, inf (or the strings '1', '2', 'inf'), "
                              f"got p={p!r}")
    return value


def lp_norm(input: torch.Tensor, p, running_mean: torch.Tensor | None = None,
            running_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
            eps: float = 1e-5, centered: bool = False) -> torch.Tensor:
    """l_p normalization (p in {1, 2, inf}): ``y = weight * (x - mean) / (s_p + eps) + bias``.

    Per channel of ``input`` (x, shape (N, C, *spatial)), over N and the spatial dims:
    mean = mean(x) and s_1 = mean|z|, s_2 = sqrt(mean z^2), s_inf = max|z|, where z = x
    ("before shifting the mean", the default) or z = x - mean (``centered=True``). In training
    the batch statistics are used and, if given, ``running_mean``/``running_scale`` are updated
    in place: r <- momentum * batch + (1 - momentum) * r (no unbiasing of the scale). In eval
    mode the running statistics are used (and required), as constants. The gradient of the
    l_inf scale is split equally among the values attaining max|z| (as torch.amax's).
    Statistics are accumulated in fp32 (fp64 for fp64 input); the output has the input's dtype
    and memory format.
    """
    return _lp_norm(input, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                    centered, None)


def _lp_norm(x, p, running_mean, running_scale, weight, bias, training, momentum, eps, centered,
             counter):
    if type(x) not in _PLAIN or _is_compiling() or _dispatch_modes():
        return _lp_norm_traced(x, p, running_mean, running_scale, weight, bias, training,
                               momentum, eps, centered, counter)
    try:
        sig = _signature("lp_norm", x, training, None, None, _P[p], centered,
                         counter is not None,
                         _channels(weight, bias, running_mean, running_scale))
        plan = _plan_get(sig) or _lp_norm_plan(sig, x, p, running_mean, running_scale, weight,
                                                bias, training, momentum, eps)
        momentum, eps = float(momentum), float(eps)
    except (AttributeError, TypeError, KeyError, ValueError):  # validation says what is wrong
        _validate_lp_norm("lp_norm", x, p, running_mean, running_scale, weight, bias, training,
                          momentum, eps)
        raise
    if not (0.0 <= momentum <= 1.0 and 0.0 < eps < _INF):
        _check_scalars("lp_norm", momentum, eps)
    return _run(plan, x, running_mean, running_scale, weight, bias, momentum, eps, None,
                counter)


def _validate_lp_norm(op, x, p, running_mean, running_scale, weight, bias, training, momentum,
                      eps):
    _check_input(op, x)  # before p: a wrong input is the first thing to say
    p = _check_p(op, p)
    _validate_batch_norm(op, x, running_mean, running_scale, weight, bias, training, momentum,
                         eps, None, LP_NORM.running)
    return p


def _lp_norm_plan(sig, x, p, running_mean, running_scale, weight, bias, training, momentum,
                  eps):
    """The cold path: validate a new signature, make its plan and cache it."""
    _validate_lp_norm("lp_norm", x, p, running_mean, running_scale, weight, bias, training,
                      momentum, eps)
    if x.numel() == 0:
        return PLANS.put(sig, _EMPTY)
    return backends.make_plan(sig, x)


def _lp_norm_traced(x, p, running_mean, running_scale, weight, bias, training, momentum, eps,
                    centered, counter):
    p = _validate_lp_norm("lp_norm", x, p, running_mean, running_scale, weight, bias, training,
                          momentum, eps)
    if x.numel() == 0:
        return _empty_batch(x, weight, bias, None, counter)
    name = backends.backend_name_for_compile("lp_norm", str(x.device),
                                             str(x.dtype).replace("torch.", ""),
                                             backends.GENERATION)
    plan = LP_NORM.op_plan("lp_norm", training, None, p, bool(centered), name)
    return NormFunction.apply(x, weight, bias, Call(
        running_mean, running_scale, plan, float(momentum), float(eps), None, counter))


# ----------------------------------------------------------------------------- any family


def norm(op: str, x: torch.Tensor, running_mean: torch.Tensor | None = None,
         running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
         eps: float = 1e-5) -> torch.Tensor:
    """The functional op of the registered op family ``op`` (see :mod:`bnkernels.families`)
    for calls whose only flag is ``training``: ``running_var`` is the family's second running
    buffer, if it has one. BatchNorm's and l_p's own entry points (:func:`batch_norm`,
    :func:`lp_norm`) take their flags. Raises for an op no family names."""
    return _norm(family_of(op), x, running_mean, running_var, weight, bias, training, momentum,
                 eps, None)


def _norm(family, x, running_mean, running_var, weight, bias, training, momentum, eps, counter):
    op = family.name
    if type(x) not in _PLAIN or _is_compiling() or _dispatch_modes():
        _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training,
                             momentum, eps, None, family.running)
        if x.numel() == 0:
            return _empty_batch(x, weight, bias, None, counter)
        name = backends.backend_name_for_compile(op, str(x.device),
                                                 str(x.dtype).replace("torch.", ""),
                                                 backends.GENERATION, op)
        plan = family.op_plan(op, training, None, None, None, name)
        return NormFunction.apply(x, weight, bias, Call(
            running_mean, running_var, plan, float(momentum), float(eps), None, counter))
    sig = _signature(op, x, training, None, None, None, None, counter is not None,
                     _channels(weight, bias, running_mean, running_var))
    plan = _plan_get(sig)
    if plan is None:
        _validate_batch_norm(op, x, running_mean, running_var, weight, bias, training,
                             momentum, eps, None, family.running)
        plan = PLANS.put(sig, _EMPTY) if x.numel() == 0 else backends.make_plan(sig, x)
    momentum, eps = float(momentum), float(eps)
    if not (0.0 <= momentum <= 1.0 and 0.0 < eps < _INF):
        _check_scalars(op, momentum, eps)
    return _run(plan, x, running_mean, running_var, weight, bias, momentum, eps, None, counter)
