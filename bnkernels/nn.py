"""Drop-in normalization modules and ``convert``.

Modules subclass their torch twin where one exists (same constructor arguments, parameters,
buffers and state_dict keys) and run bnkernels' ops: BatchNorm1d/2d/3d, NoisyBatchNorm1d/2d/3d,
SyncBatchNorm; LpNorm1d/2d/3d have no twin and follow BatchNorm's conventions.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ValidationError, ValidationTypeError
from .families import family_of
from .functional import (
    ACTIVATIONS,
    _batch_norm,
    _check_p,
    _check_scalars,
    _lp_norm,
    _norm,
    expected_noise_affine,
)
from .noise import NoiseConfig
from .sync import sync_batch_norm


def _check_activation(module, activation):
    if activation not in ACTIVATIONS:
        raise ValidationError(f"{type(module).__name__}: activation must be one of {ACTIVATIONS}, "
                              f"got {activation!r}")
    return activation


def _check_channels(module, x: torch.Tensor) -> None:
    if x.dim() >= 2 and x.shape[1] != module.num_features:
        raise ValidationError(
            f"{type(module).__name__}: input has {x.shape[1]} channels (shape "
            f"{tuple(x.shape)}) but the module was built for num_features={module.num_features}")


def _check_num_features(cls, num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValidationError(f"{cls.__name__}: num_features must be a positive int, "
                              f"got {num_features!r}")


def _running(module, input, running_mean, running_var):
    """Checks a module's ``input`` (dims, channels) and gives ``(running_mean, running_var,
    bn_training, factor, counter)`` for its call, by torch's _BatchNorm rules, each buffer read
    once: in training with running statistics the
    batch counter advances by the kernels (``counter``, no op of its own), so a call that is
    refused leaves it as it was (torch's modules count the batch first). When momentum is None
    the factor is the cumulative average 1/num_batches_tracked with this batch counted, the
    counter read on the host as torch does."""
    module._check_input_dim(input)
    if input.shape[1] != module.num_features:
        _check_channels(module, input)
    momentum = module.momentum
    factor = 0.0 if momentum is None else momentum
    if not module.training:
        return (running_mean, running_var, running_mean is None and running_var is None, factor,
                None)
    if not module.track_running_stats:
        return None, None, True, factor, None
    counter = module.num_batches_tracked
    if counter is not None and momentum is None:
        factor = 1.0 / (float(counter) + 1.0)
    return running_mean, running_var, True, factor, counter


def _check_momentum(module, momentum):
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValidationError(f"{type(module).__name__}: momentum must be in [0, 1] or None, "
                              f"got {momentum}")


def _check_eps(module, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < math.inf:
        raise ValidationError(f"{type(module).__name__}: eps must be a positive finite number, got "
                              f"{eps!r} (the default is 1e-5)")


# torch's BatchNorm takes ``bias=`` (a keyword) in recent versions; the modules here always
# list it, and refuse bias=False only where the installed torch cannot honour it.
_TORCH_HAS_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _bias_kwargs(cls, bias: bool) -> dict:
    if _TORCH_HAS_BIAS:
        return {"bias": bias}
    if not bias:
        raise ValidationError(f"{cls.__name__}: bias=False needs a torch whose BatchNorm takes "
                              f"bias= (torch {torch.__version__} does not); use affine=False, "
                              "or a newer torch")
    return {}


def _doc(ours: str, twin: type, holds: str = "everything it says holds here") -> str:
    """A module's docstring: bnkernels' part, then its torch twin's whole docstring."""
    theirs = inspect.getdoc(twin)
    ours = inspect.cleandoc(ours)
    if not theirs:  # python -OO
        return ours
    return (f"{ours}\n\nThe documentation of ``{twin.__module__.split('.modules')[0]}."
            f"{twin.__name__}`` follows; {holds}.\n\n{theirs}")


_BN_DOC = """``torch.nn.{name}`` on bnkernels' kernels: a drop-in replacement.

    The same constructor arguments, parameters, buffers and state_dict keys, and the same
    behaviour (training and eval, ``track_running_stats=False``, ``momentum=None``, an empty
    batch); the backend is bnkernels' choice (:func:`bnkernels.set_backend`). In addition:

    Args:
        activation: ``None`` (default) or ``"relu"``: a ReLU fused into the normalization's
            kernels, forward and backward.

    Bad input raises errors that name the argument and the fix; they are ``ValueError`` or
    ``TypeError`` and also ``RuntimeError``, as torch's are. ``bias=False`` needs a torch whose
    BatchNorm takes ``bias``."""

_NOISY_DOC = """``torch.nn.{name}`` with the time-varying noise of Santurkar et al. (2018),
    Algorithm 1, in training; on bnkernels' kernels.

    At every training step t, per channel j: mu_j ~ U(-n_mu, n_mu), sigma_j ~ U(1, n_sigma);
    per element m ~ U(mu_j - r_mu, mu_j + r_mu) and s ~ N(sigma_j, r_sigma); the output is
    act(s * a + m), a the BatchNorm output after the affine. The noise comes from a
    counter-based RNG keyed by ``seed`` and the ``noise_step`` buffer (which advances on the
    device after each training forward, and is saved in the state_dict), so a checkpoint
    resumes the same noise. Eval mode adds no random noise: it applies the noise's expectation,
    act(E[s] a + E[m]). The arguments, parameters and buffers are torch's, plus:

    Args:
        noise: a :class:`bnkernels.NoiseConfig` (default: the paper's constants).
        seed: an int in [0, 2**63) keying the noise.
        activation: ``None`` (default) or ``"relu"``, fused.

    Bad input raises errors that are ``ValueError``/``TypeError`` and also ``RuntimeError``."""

_NOISY_HOLDS = "it holds here for the normalization and affine the noise is applied to"


class _BatchNormMixin:
    """The forward of torch's ``_BatchNorm`` on :func:`bnkernels.batch_norm`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True, activation: str | None = None) -> None:
        self._init_extra(num_features, momentum, activation, eps)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype,
                         **_bias_kwargs(type(self), bias))  # torch's class, next in the MRO
        self.activation = activation

    def _init_extra(self, num_features, momentum, activation, eps=1e-5):
        _check_num_features(type(self), num_features)
        _check_momentum(self, momentum)
        _check_eps(self, eps)
        self.activation = _check_activation(self, activation)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")

    def forward(self, input: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(bn(input) + residual): ``residual`` (input's shape and dtype) is added before
        the activation in the same pass (see :func:`bnkernels.batch_norm`)."""
        return self._forward(input, residual, self.activation)

    def _forward(self, input, residual, activation):
        """forward with the activation given (:func:`bnkernels.fuse`'s call sites)."""
        rm, rv, bn_training, factor, counter = _running(self, input, self.running_mean,
                                                        self.running_var)
        return _batch_norm(input, rm, rv, self.weight, self.bias, bn_training, factor, self.eps,
                           activation, None, counter, residual)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    __doc__ = _doc(_BN_DOC.format(name="BatchNorm1d"), nn.BatchNorm1d)


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    __doc__ = _doc(_BN_DOC.format(name="BatchNorm2d"), nn.BatchNorm2d)


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    __doc__ = _doc(_BN_DOC.format(name="BatchNorm3d"), nn.BatchNorm3d)


# ----------------------------------------------------------------------------- noisy BatchNorm


class _NoisyBatchNormMixin(_BatchNormMixin):
    """BatchNorm with the paper's time-varying noise in training (Algorithm 1).

    The noise of a training forward is keyed by (``seed``, ``noise_step``); ``noise_step`` is
    a buffer that advances on the device after every training forward, so a checkpoint resumes
    the same noise sequence and no host synchronisation is needed. Eval mode adds no random
    noise: it applies the noise's expectation, act(E[s] a + E[m]) (see
    :func:`bnkernels.noisy_batch_norm`)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True, noise: NoiseConfig = NoiseConfig(),
                 seed: int = 0, activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, activation=activation)
        self._init_noise(noise, seed)

    def _init_noise(self, noise, seed):
        if not isinstance(noise, NoiseConfig):
            raise ValidationTypeError(
                f"{type(self).__name__}: noise must be a bnkernels.NoiseConfig, "
                f"got {type(noise).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValidationError(f"{type(self).__name__}: seed must be an int in [0, 2**63), "
                             f"got {seed!r}")
        self.noise = noise
        self.seed = seed
        device = self.weight.device if self.weight is not None else None
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise={self.noise}, seed={self.seed}"

    def _forward(self, input, residual, activation):
        """act(s * a + m + residual) in training (see :func:`bnkernels.noisy_batch_norm`)."""
        rm, rv, bn_training, factor, counter = _running(self, input, self.running_mean,
                                                        self.running_var)
        weight, bias = self.weight, self.bias
        if not self.training:  # the noise's expectation in place of the noise
            weight, bias = expected_noise_affine(self.noise, weight, bias, input,
                                                 self.running_mean)
            return _batch_norm(input, rm, rv, weight, bias, bn_training, factor, self.eps,
                               activation, None, counter, residual)
        step = self.noise_step
        y = _batch_norm(input, rm, rv, weight, bias, True, factor, self.eps, activation,
                        (self.noise, self.seed, step), counter, residual)
        step.add_(1)
        return y


class NoisyBatchNorm1d(_NoisyBatchNormMixin, nn.BatchNorm1d):
    __doc__ = _doc(_NOISY_DOC.format(name="BatchNorm1d"), nn.BatchNorm1d, _NOISY_HOLDS)


class NoisyBatchNorm2d(_NoisyBatchNormMixin, nn.BatchNorm2d):
    __doc__ = _doc(_NOISY_DOC.format(name="BatchNorm2d"), nn.BatchNorm2d, _NOISY_HOLDS)


class NoisyBatchNorm3d(_NoisyBatchNormMixin, nn.BatchNorm3d):
    __doc__ = _doc(_NOISY_DOC.format(name="BatchNorm3d"), nn.BatchNorm3d, _NOISY_HOLDS)


# ----------------------------------------------------------------------------- l_p normalization


_LP_DOC = """l_p normalization of {shape} input, per channel (Section 3.3 of Santurkar et al.,
    2018), with BatchNorm's conventions.

    y = weight * (x - mean) / (s_p + eps) + bias, with mean and s_p per channel over the batch
    and spatial dims: s_1 = mean|z|, s_2 = sqrt(mean z^2), s_inf = max|z|, z = x (the paper's
    "before shifting the mean") or x - mean (``centered=True``). See
    :func:`bnkernels.lp_norm`.

    Args:
        num_features: C, the number of channels.
        p: 1, 2 or ``math.inf`` (also the strings "1", "2", "inf"). Default 2.
        eps: added to s_p. Default 1e-5.
        momentum: for ``running_mean`` and ``running_scale``, as BatchNorm's; ``None`` for a
            cumulative average. Default 0.1.
        affine: learnable ``weight`` and ``bias`` (default True).
        track_running_stats: keep ``running_mean``, ``running_scale`` and
            ``num_batches_tracked`` and use them in eval mode (default True); else batch
            statistics in eval too.
        centered: take s_p over x - mean instead of x (default False).
        device, dtype: of the parameters and buffers.

    Shape: {shape} in, the same out (and the same memory format)."""


class FamilyNorm(nn.Module):
    """The module of a registered op family (:mod:`bnkernels.families`), BatchNorm's
    conventions: parameters ``weight``/``bias`` (if ``affine``), the family's running buffers
    (``running_mean``, and its second one if it has one, initialized to ones) and
    ``num_batches_tracked`` (if ``track_running_stats``), ``momentum`` None for a cumulative
    average. Subclass it naming ``family`` (and ``_expected_dims``, the input dims it takes;
    empty: any of 2 or more)."""

    family: str = ""
    _expected_dims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__()
        _check_num_features(type(self), num_features)
        self._family = family_of(self.family)
        _check_eps(self, eps)
        _check_momentum(self, momentum)
        factory = dict(device=device, dtype=dtype)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        for i, name in enumerate(self._family.running):
            self.register_buffer(name, (torch.zeros if i == 0 else torch.ones)(
                num_features, **factory) if track_running_stats else None)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long,
                                                                 device=device)
                             if track_running_stats else None)

    def _running_buffers(self):
        names = self._family.running
        return (getattr(self, names[0]), getattr(self, names[1]) if len(names) > 1 else None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            for i, name in enumerate(self._family.running):
                getattr(self, name).fill_(0 if i == 0 else 1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if self._expected_dims and x.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValidationError(f"{type(self).__name__}: expected {want} input (got {x.dim()}D "
                                  "input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rm, rs, bn_training, factor, counter = _running(self, input, *self._running_buffers())
        return _norm(self._family, input, rm, rs, self.weight, self.bias, bn_training, factor,
                     self.eps, counter)


class _LpNorm(FamilyNorm):
    """l_p normalization per channel (Section 3.3 of the paper), BatchNorm's conventions:
    parameters ``weight``/``bias`` (if ``affine``), buffers ``running_mean``,
    ``running_scale`` and ``num_batches_tracked`` (if ``track_running_stats``), ``momentum``
    None for a cumulative average. See :func:`bnkernels.lp_norm` for the math."""

    family = "lp_norm"

    def __init__(self, num_features: int, p=2, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, centered: bool = False,
                 device=None, dtype=None):
        _check_num_features(type(self), num_features)
        p = _check_p(type(self).__name__, p)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.p = p
        self.centered = bool(centered)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, p={self.p}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"centered={self.centered}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rm, rs, bn_training, factor, counter = _running(self, input, self.running_mean,
                                                        self.running_scale)
        return _lp_norm(input, self.p, rm, rs, self.weight, self.bias, bn_training, factor,
                        self.eps, self.centered, counter)


class LpNorm1d(_LpNorm):
    __doc__ = inspect.cleandoc(_LP_DOC.format(shape="(N, C) or (N, C, L)"))

    _expected_dims = (2, 3)


class LpNorm2d(_LpNorm):
    __doc__ = inspect.cleandoc(_LP_DOC.format(shape="(N, C, H, W)"))

    _expected_dims = (4,)


class LpNorm3d(_LpNorm):
    __doc__ = inspect.cleandoc(_LP_DOC.format(shape="(N, C, D, H, W)"))

    _expected_dims = (5,)


# ----------------------------------------------------------------------------- SyncBatchNorm


class SyncBatchNorm(_BatchNormMixin, nn.SyncBatchNorm):
    __doc__ = _doc("""``torch.nn.SyncBatchNorm`` on bnkernels' kernels: a drop-in replacement.

    In training with more than one process in ``process_group``, the per-process
    (count, mean, biased var) are all-gathered and merged by Chan's count-weighted formula, and
    the backward's per-channel gradient sums are all-reduced, so N processes compute what one
    process would on the concatenated batch (weight/bias gradients stay per process, as in
    torch, for DDP to reduce). Otherwise it is :class:`BatchNorm2d` for any input dims. Unlike
    torch's, it also runs on CPU tensors with the gloo backend (torch's DDP refuses any
    SyncBatchNorm in a CPU module: see ``examples/ddp_syncbn.py``). In addition to torch's
    arguments:

    Args:
        activation: ``None`` (default) or ``"relu"``, fused into the kernels.

    Bad input raises errors that are ``ValueError``/``TypeError`` and also ``RuntimeError``.""",
                   nn.SyncBatchNorm)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None) -> None:
        self._init_extra(num_features, momentum, activation, eps)
        nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine,
                                  track_running_stats, process_group, device=device, dtype=dtype,
                                  **_bias_kwargs(type(self), bias))
        self.activation = activation

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValidationError(f"SyncBatchNorm: expected at least 2D input (got {input.dim()}D "
                                  "input)")

    def forward(self, input: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(bn(input) + residual); ``residual`` only within one process (not across a
        multi-process group)."""
        rm, rv, bn_training, factor, counter = _running(self, input, self.running_mean,
                                                        self.running_var)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and
                                       dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        if not (self.training and world > 1):
            return _batch_norm(input, rm, rv, self.weight, self.bias, bn_training, factor,
                               self.eps, self.activation, None, counter, residual)
        if residual is not None:
            raise ValidationError(
                "SyncBatchNorm: residual= is not supported across processes (world size "
                f"{world}); add it after the layer (activation=None), or use one process")
        if input.numel() // input.shape[1] == 0 and input.numel() != 0:
            raise ValidationError("SyncBatchNorm: empty channels")
        _check_scalars("SyncBatchNorm", factor, self.eps, self.activation)  # every call
        return sync_batch_norm(input, rm, rv, self.weight, self.bias, factor, self.eps,
                               self.activation, group, world, counter)


# ----------------------------------------------------------------------------- convert

TARGETS = ("batchnorm", "noisy", "l1", "l2", "linf", "none", "torch")
_LP = {"l1": 1, "l2": 2, "linf": math.inf}
_OURS = {
    "batchnorm": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
    "noisy": {1: NoisyBatchNorm1d, 2: NoisyBatchNorm2d, 3: NoisyBatchNorm3d},
    "lp": {1: LpNorm1d, 2: LpNorm2d, 3: LpNorm3d},
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, _LpNorm))


def _dim_of(m: nn.Module, default: int) -> int:
    for d, classes in ((1, (nn.BatchNorm1d, LpNorm1d)), (2, (nn.BatchNorm2d, LpNorm2d)),
                       (3, (nn.BatchNorm3d, LpNorm3d))):
        if isinstance(m, classes):
            return d
    return default  # SyncBatchNorm takes any dims


def _replacement(m: nn.Module, to: str, sync: bool, dim: int, kwargs: dict) -> nn.Module:
    if to == "none":
        return nn.Identity()
    ref = m.weight if m.weight is not None else m.running_mean
    factory = dict(device=ref.device if ref is not None else None,
                   dtype=ref.dtype if ref is not None else None)
    common = dict(eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, **factory)
    d = _dim_of(m, dim)
    if to in _LP:
        if sync:
            raise NotImplementedError("convert: sync=True is only for to='batchnorm' or 'torch'")
        return _OURS["lp"][d](m.num_features, p=_LP[to], **common, **kwargs)
    if sync:
        if to == "noisy":
            raise NotImplementedError("convert: sync=True is only for to='batchnorm' or 'torch'")
        cls = SyncBatchNorm if to == "batchnorm" else nn.SyncBatchNorm
    else:
        cls = _OURS[to][d]
    return cls(m.num_features, **common, **kwargs)


@torch.no_grad()
def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy what the target has an equivalent for: weight, bias, running_mean, the batch
    counter, and running_var <-> running_scale for l2 (s_2^2 = var, plus mean^2 uncentered)."""
    if getattr(src, "affine", False) and getattr(dst, "affine", False):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    if getattr(src, "running_mean", None) is None or getattr(dst, "running_mean", None) is None:
        return
    dst.running_mean.copy_(src.running_mean)
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    src_var = getattr(src, "running_var", None)
    dst_var = getattr(dst, "running_var", None)
    if src_var is not None and dst_var is not None:
        dst_var.copy_(src_var)
    elif isinstance(dst, _LpNorm) and src_var is not None and dst.p == 2:
        shift = 0 if dst.centered else src.running_mean.square()
        dst.running_scale.copy_((src_var + shift).sqrt())
    elif isinstance(src, _LpNorm) and dst_var is not None and src.p == 2:
        shift = 0 if src.centered else src.running_mean.square()
        dst_var.copy_((src.running_scale.square() - shift).clamp_min(0))
    elif isinstance(src, _LpNorm) and isinstance(dst, _LpNorm) and src.p == dst.p \
            and src.centered == dst.centered:
        dst.running_scale.copy_(src.running_scale)


def convert(model: nn.Module, to: str = "batchnorm", sync: bool = False, dim: int = 2,
            **kwargs) -> nn.Module:
    """Replace every normalization layer of ``model`` (torch's BatchNorm*d and SyncBatchNorm,
    and bnkernels' own) and return the model.

    ``to``: "batchnorm" (bnkernels.BatchNorm*d), "noisy" (NoisyBatchNorm*d), "l1"/"l2"/"linf"
    (LpNorm*d), "none" (nn.Identity: the paper's standard network), "torch" (torch.nn's
    BatchNorm*d). ``sync=True`` gives SyncBatchNorm (to "batchnorm" or "torch"). Weights,
    biases and running statistics are copied where the target has them; the layer keeps its
    device, dtype and train/eval mode. ``dim`` is the BatchNorm dimensionality used for layers
    that do not tell it (SyncBatchNorm). ``kwargs`` go to the new layers' constructors (e.g.
    ``activation``, ``noise``, ``seed``, ``centered``). A model that is itself a
    normalization layer is returned replaced.
    """
    if to not in TARGETS:
        raise ValidationError(f"convert: unknown target {to!r}; choose one of {TARGETS}")
    if _is_norm(model):
        new = _replacement(model, to, sync, dim, kwargs)
        if to != "none":
            _copy_state(model, new)
        return new.train(model.training)
    for name, child in model.named_children():
        new = convert(child, to, sync, dim, **kwargs)
        if new is not child:
            setattr(model, name, new)
    return model
