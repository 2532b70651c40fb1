"""Backend registry and selection, and :func:`make_plan`, the cold path of every call.

A backend (one folder each: ``reference/``, ``triton/``, ``cuda/``, ``cpu/``) is an object with a
``name``, ``unavailable_reasons()`` (why it cannot run at all on this machine),
``not_supported_reasons(op, x)`` (why it cannot take this input), ``plan(sig)``, which
resolves everything about a call that depends only on its signature into a
:class:`~.plan.Plan`, and ``noise(x, noise)`` (the noise noisy BatchNorm applies).

Selection follows ``set_backend`` or the ``BNKERNELS_BACKEND`` environment variable; "auto"
picks the fastest backend that fits the input and raises, listing every backend's reasons,
when none does. "auto" on a CUDA tensor orders cuda and triton by the measured-speed table
(:mod:`bnkernels.backends.speed`, ``cuda_speed.json``), triton first where nothing was
measured; it considers the cuda backend only once its extension is built, so "auto" never
starts a CUDA compile (``set_backend("cuda")`` builds it on first use). "auto" on a CPU tensor
takes triton when the Triton interpreter is on (the tests), else the cpu backend (C kernels,
built once per machine in seconds and cached), else the reference.

The hot path never selects: :func:`make_plan` runs once per :class:`~.plan.Signature` and
puts its plan in :data:`~.plan.PLANS`. ``set_backend`` clears that cache; the environment
variable is read when a plan is made.

The backends import only :mod:`.plan` and :mod:`.layout` (leaves), never this module.
"""

from __future__ import annotations

import os

import torch

from . import speed
from .cpu import CpuBackend
from .cuda import CudaBackend
from .family import Family, family_of
from .plan import PLANS, ContiguousChannels, Signature
from .reference import ReferenceBackend
from .triton import TritonBackend

_BACKENDS = {b.name: b for b in (TritonBackend(), CudaBackend(), CpuBackend(),
                                  ReferenceBackend())}
_CHOICES = ("auto", *_BACKENDS)
_selected: str | None = None  # None: read BNKERNELS_BACKEND
GENERATION = 0  # incremented whenever the selection may change (read by compiled graphs)
RESIDUAL = "+residual"  # the op name's suffix a backend sees for a call with a residual


def clear_plans() -> None:
    """Forget every cached plan (the next call of each signature selects again)."""
    global GENERATION
    GENERATION += 1
    PLANS.clear()


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {list(_CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for all ops: "auto", "triton", "cuda" or "reference".

    Overrides the ``BNKERNELS_BACKEND`` environment variable.
    """
    global _selected
    _selected = _check_name(name, "set_backend")
    clear_plans()


def get_backend() -> str:
    """The name selected by ``set_backend``, else ``BNKERNELS_BACKEND``, else "auto"."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("BNKERNELS_BACKEND", "auto"), "BNKERNELS_BACKEND")


def available_backends() -> dict[str, list[str]]:
    """Every backend with the reasons it cannot run here (an empty list: it is available)."""
    return {name: b.unavailable_reasons() for name, b in _BACKENDS.items()}


def backend(name: str):
    """The backend object called ``name`` ("triton", "cuda" or "reference"; not "auto")."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(_BACKENDS)}")
    return _BACKENDS[name]


def _auto_order(x: torch.Tensor, op: str = "batch_norm") -> list[str]:
    if x.device.type == "cuda":
        if not _BACKENDS["cuda"].is_built():
            return ["triton", "reference"]
        if speed.faster(op, x) == "cuda":
            return ["cuda", "triton", "reference"]
        return ["triton", "cuda", "reference"]
    # On the CPU the Triton interpreter is a correctness tool, chosen only when it is switched
    # on; otherwise the cpu backend's C kernels, and the reference where they cannot be built.
    if _BACKENDS["triton"].interpreting():
        return ["triton", "cpu", "reference"]
    return ["cpu", "reference"]


def select(op: str, x: torch.Tensor, name: str | None = None, family: Family | None = None):
    """The backend that runs ``op`` on ``x`` (``name``, else the selection); raises listing
    every reason when none fits. ``family``: the op family the backend must have a plan for.
    Not for the hot path (it may read the environment and look for the CUDA extension)."""
    name = name or get_backend()
    names = _auto_order(x, op) if name == "auto" else [name]
    reasons = {}
    for n in names:
        b = _BACKENDS[n]
        why = b.unavailable_reasons() + b.not_supported_reasons(op, x)
        if family is not None and not family.supports(n):
            why.append(f"the {family.name!r} op family has no {n} plan")
        if not why:
            return b
        reasons[n] = why
    lines = "\n".join(f"  {n}: {r}" for n, rs in reasons.items() for r in rs)
    raise RuntimeError(f"bnkernels: no backend can run {op} (backend={name!r}):\n{lines}")


def make_plan(sig: Signature, x: torch.Tensor):
    """The plan of ``sig`` (``x`` is a tensor of that signature), made by the backend the
    signature names or the selection picks, and cached in :data:`~.plan.PLANS`."""
    family = family_of(sig.op)
    op = "noisy_batch_norm" if sig.noisy is not None else sig.op
    if sig.residual is not None:
        op += RESIDUAL
    plan = family.make_plan(select(op, x, sig.backend, family).name, sig)
    if not sig.channels_contiguous:
        plan = ContiguousChannels(plan)
    return PLANS.put(sig, plan)


def plan_of(sig: Signature, x: torch.Tensor):
    """The cached plan of ``sig``, made on first use."""
    plan = PLANS.get(sig)
    return plan if plan is not None else make_plan(sig, x)


@torch.compiler.assume_constant_result
def backend_name_for_compile(op: str, device: str, dtype_name: str, generation: int,
                             family: str | None = None) -> str:
    """The backend a compiled graph calls (through the registered ops), decided once when the
    graph is traced: dynamo runs this function instead of tracing it and keeps its result as a
    constant. ``generation`` is :data:`GENERATION`, which the caller reads as a module global:
    dynamo guards on it, so a new selection retraces the graph. Shapes may be symbolic in a
    graph, so the choice does not depend on the size: "auto" takes the measured-speed table's
    entry for the smallest inputs."""
    del generation  # only there to be guarded on
    x = torch.empty(0, device=device, dtype=getattr(torch, dtype_name))
    return select(op, x, family=None if family is None else family_of(family)).name


__all__ = ["available_backends", "backend", "backend_name_for_compile", "clear_plans",
           "get_backend", "make_plan", "plan_of", "select", "set_backend"]
