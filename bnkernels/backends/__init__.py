"""Backend registry and selection.

A backend is an object with a ``name``, ``unavailable_reasons()`` (why it cannot run at all on
this machine) and ``not_supported_reasons(op, x)`` (why it cannot take this input), plus the op
entry points (``batch_norm_fwd``/``batch_norm_bwd``). Selection follows ``set_backend`` or the
``BNKERNELS_BACKEND`` environment variable; "auto" picks the fastest backend that fits the input
and raises, listing every backend's reasons, when none does.

"auto" on a CUDA tensor orders cuda and triton by the measured-speed table
(:mod:`bnkernels.backends.speed`, ``cuda_speed.json``): the faster one for the GPU, op and size
first, triton first where nothing was measured (the table ships empty). It considers the cuda
backend only once its extension is built (prebuilt or JIT-cached), so "auto" never starts a
compile; ``set_backend("cuda")`` builds it on first use.
"""

from __future__ import annotations

import os

import torch

from . import speed
from ._base import Backend
from .cuda_backend import CudaBackend
from .reference_backend import ReferenceBackend
from .triton_backend import TritonBackend

_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (TritonBackend(), CudaBackend(), ReferenceBackend())}
_CHOICES = ("auto", *_BACKENDS)
_selected: str | None = None  # None: read BNKERNELS_BACKEND


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


def get_backend() -> str:
    """The name selected by ``set_backend``, else ``BNKERNELS_BACKEND``, else "auto"."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("BNKERNELS_BACKEND", "auto"), "BNKERNELS_BACKEND")


def available_backends() -> dict[str, list[str]]:
    """Every backend with the reasons it cannot run here (an empty list: it is available)."""
    return {name: b.unavailable_reasons() for name, b in _BACKENDS.items()}


def backend(name: str) -> Backend:
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
    # On the CPU the Triton interpreter is a correctness tool, chosen only when it is switched on.
    return ["triton", "reference"] if _BACKENDS["triton"].interpreting() else ["reference"]


def select(op: str, x: torch.Tensor, **inputs) -> Backend:
    """The backend that runs ``op`` on ``x``; raises listing every reason when none fits."""
    name = get_backend()
    names = _auto_order(x, op) if name == "auto" else [name]
    reasons = {}
    for n in names:
        b = _BACKENDS[n]
        why = b.unavailable_reasons() + b.not_supported_reasons(op, x, **inputs)
        if not why:
            return b
        reasons[n] = why
    lines = "\n".join(f"  {n}: {r}" for n, rs in reasons.items() for r in rs)
    raise RuntimeError(f"bnkernels: no backend can run {op} (backend={name!r}):\n{lines}")


__all__ = ["Backend", "available_backends", "backend", "get_backend", "select", "set_backend"]
