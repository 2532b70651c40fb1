"""Op families and their descriptors: the one place that names what an op family is.

A :class:`Family` (BatchNorm with its noisy variant, l_p normalization, or one a user
registers) names, once:

* ``name``: the op of its :class:`~.plan.Signature` (``sig.op``) and of its registered torch
  ops (``bnkernels::<name>``);
* ``running``: its running buffers (the second one is BatchNorm's ``running_var``, l_p's
  ``running_scale``; a family may keep only ``running_mean``);
* ``saved``: what its forward saves for its backward (two per-channel statistics; a noisy
  call's step comes apart, as one 1-element int64 tensor, on every backend);
* ``plans``: its plan per backend name (``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``,
  ...), each a class taking a Signature or a ``"module:Class"`` string imported on first use
  (a backend's kernels load only when its first plan is made);
* ``op_plan``: the plan of the traced route (torch.compile, export, dispatch modes), which
  calls the family's registered torch ops;
* ``grads``: its backward as differentiable torch ops (the double backward), or None with
  ``no_grads`` saying why it declines;
* ``bench``: the ops the benchmarks time for it (:class:`BenchOp`, by op name: BatchNorm has
  two, plain and noisy); by default one, named after the family, run by its functional op.

Every layer looks the family of a call up here (:func:`family_of`): the backends' ``plan``,
the registered ops, the double backward, ``functional`` and the modules. An op no family
names raises :class:`UnknownOpError`; a backend a family has no plan for is reported by
selection as "not supported", never silently replaced by another family's plan.

This module imports nothing else from bnkernels (a leaf beside :mod:`.plan`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


class UnknownOpError(ValueError):
    """An op that no registered :class:`Family` names."""


@dataclass
class Family:
    """The descriptor of one op family (see the module docstring)."""

    name: str
    plans: dict  # backend name -> plan class (or "module:Class")
    running: tuple = ("running_mean", "running_var")
    saved: tuple = ("mean", "invstd")
    op_plan: Callable | None = None  # (sig, backend name) -> the traced route's plan
    grads: Callable | None = None  # (flags, dy, x, weight, bias, saved, needs) -> (dx, dw,
    #                                 db), differentiable; saved: a Saved (backends.plan)
    no_grads: str = "its backward is not written as differentiable torch ops"
    instead: str = "Take first derivatives only (create_graph=False)."
    label: str = ""  # the name errors give it (default: name)
    functional: Callable | None = None  # the functional op (set by bnkernels.functional)
    doc: str = ""
    bench: dict | None = None  # benchmark op name -> BenchOp; None: {name: BenchOp()}
    _resolved: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.bench is None:
            self.bench = {self.name: BenchOp()}

    def plan_class(self, backend: str):
        """The plan class of this family on ``backend`` (imported on first use), or None."""
        cls = self._resolved.get(backend)
        if cls is None:
            spec = self.plans.get(backend)
            if spec is None:
                return None
            cls = self._resolved[backend] = resolve(spec)
        return cls

    def make_plan(self, backend: str, sig):
        cls = self.plan_class(backend)
        if cls is None:
            raise RuntimeError(f"bnkernels: the {backend!r} backend has no plan for "
                               f"{self.name!r} (it has plans for {sorted(self.plans)})")
        return cls(sig)

    def supports(self, backend: str) -> bool:
        return backend in self.plans

    def add_plan(self, backend: str, plan: Any) -> None:
        """Give the family a plan on ``backend`` (a class or ``"module:Class"``)."""
        self.plans[backend] = plan
        self._resolved.pop(backend, None)


def resolve(spec):
    """A callable given as itself or as a ``"module:attr"`` string (imported on first use)."""
    if isinstance(spec, str):
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)
    return spec


@dataclass(frozen=True)
class BenchOp:
    """One op the benchmarks time (``bnkernels bench``, ``benchmarks/``) for a family.

    Each field is a maker ``(p) -> f(x, running_mean, running_var, weight, bias, training) ->
    y`` with the benchmarks' momentum and eps (``p``: l_p's norm as the benchmarks name it,
    "1", "2" or "inf"; None for other ops), a callable or a ``"module:function"`` string
    imported on first use:

    * ``run``: bnkernels' op (None: the family's functional op,
      :func:`bnkernels.functional.norm`, for calls whose only flag is ``training``);
    * ``eager``: the op as a torch composite (the "eager" providers), or None: they skip it;
    * ``oracle``: its forward output in fp64 for the benchmarks' correctness check, or None:
      outputs are not compared (noisy BatchNorm: each provider draws its own noise).
    """

    run: Any = None
    eager: Any = None
    oracle: Any = None


FAMILIES: dict[str, Family] = {}


def register(family: Family, replace: bool = False) -> Family:
    """Register ``family`` under its name (a second family of one name raises unless
    ``replace``)."""
    if not isinstance(family, Family):
        raise TypeError(f"register: expected a bnkernels Family, got {type(family).__name__}")
    if family.name in FAMILIES and not replace and FAMILIES[family.name] is not family:
        raise ValueError(f"register: an op family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def bench_ops() -> dict:
    """Every benchmark op of the registered families: op name -> (Family, BenchOp)."""
    return {op: (fam, b) for fam in FAMILIES.values() for op, b in fam.bench.items()}


def bench_op(op: str):
    """(Family, BenchOp) of the benchmark op ``op``; raises :class:`UnknownOpError` for an op
    no registered family names."""
    found = bench_ops().get(op)
    if found is None:
        raise UnknownOpError(f"bnkernels: no op family names the benchmark op {op!r} "
                             f"(known: {sorted(bench_ops())}); register one with "
                             "bnkernels.families.register(Family(..., bench=...))")
    return found


def family_of(op: str) -> Family:
    """The family of ``op``; raises :class:`UnknownOpError` naming the registered ones."""
    fam = FAMILIES.get(op)
    if fam is None:
        raise UnknownOpError(f"bnkernels: no op family is registered as {op!r} (registered: "
                             f"{sorted(FAMILIES)}); register one with "
                             "bnkernels.families.register(Family(...))")
    return fam


__all__ = ["FAMILIES", "BenchOp", "Family", "UnknownOpError", "bench_op", "bench_ops",
           "family_of", "register", "resolve", "unregister"]
