"""What the claims read from the saved runs: the measurements (medians over a run's records),
one seed's result of a check (:class:`Measured`), how a claim is described (:class:`Claim`),
the comparisons with their margin, and the formatting of numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from .activations import moment_changes
from .plots import Run, base_name

# ----------------------------------------------------------------------------- measurements


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def early_train_acc(run: Run, until: int) -> float:
    """Mean per-minibatch training accuracy over the logged steps 0..until."""
    return _mean(r["acc"] for r in run.of("train") if r["step"] <= until)


def final_train(run: Run, key: str = "acc", frac: float = 0.1) -> float:
    """Mean of ``key`` over the last ``frac`` of the logged training records."""
    recs = run.of("train")
    k = max(1, int(len(recs) * frac))
    return _mean(r[key] for r in recs[-k:])


def final_test_acc(run: Run) -> float:
    recs = run.of("test")
    return recs[-1]["acc"] if recs else math.nan


def ics_mean(run: Run, key: str) -> float:
    return _mean(r[key] for r in run.of("ics"))


def landscape_median(run: Run, key: str, direction: str = "gradient",
                     until: int | None = None) -> float:
    recs = [r for r in run.of("landscape", direction=direction)
            if until is None or r["step"] <= until]
    if key == "loss_band":
        return _median(r["loss_max"] - r["loss_min"] for r in recs)
    return _median(r[key] for r in recs)


def hessian_median(run: Run) -> float:
    """Median over a run's measurements of |top Hessian eigenvalue| (power iteration's
    eigenvalue of largest magnitude): the Hessian's spectral norm, the local beta."""
    return _median(abs(r["top_eigenvalue"]) for r in run.of("hessian"))


def moment_shift(run: Run) -> float:
    """Median over sampled units and step pairs of |change of mean| + |change of std| between
    successive steps (Figs. 7, 8, 14)."""
    out = []
    for layer in run.config.act_layers:
        recs = run.of("act", layer=layer)
        by_step = {r["step"]: r for r in recs}
        for ch in moment_changes(recs):
            a, b = by_step[ch["step"]], by_step[ch["step"] + 1]
            for u, dm in enumerate(ch["d_mean"]):
                out.append(dm + abs(math.sqrt(b["var"][u]) - math.sqrt(a["var"][u])))
    return _median(out)


# ----------------------------------------------------------------------------- claims


@dataclass
class Measured:
    """What a claim's check found in one seed's runs: ``text`` with ``$name`` placeholders for
    ``values`` (formatted by ``kinds``: "pct", or a number of significant digits), and the
    verdict of the criterion (None: could not be measured)."""

    text: str
    values: dict[str, float] = field(default_factory=dict)
    held: bool | None = None
    kinds: dict[str, str | int] = field(default_factory=dict)


def _missing(why: str = "runs missing") -> Measured:
    return Measured(why)


@dataclass(frozen=True)
class Claim:
    """One claim of the paper and how it is checked here."""

    text: str  # the claim
    figure: str  # where the paper shows it
    paper: str  # the paper's number(s)
    criterion: str  # when it counts as held in one seed
    check: Callable  # (runs of one seed by base name, suite) -> Measured
    cause: Callable | None = None  # (runs by seed, suite, row) -> why a seed did not hold


def _g(runs, model, norm, lr):
    return runs.get(base_name(model, norm, lr))


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _ok(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


MARGIN = 0.01
"""A comparison "a < b" of two measurements holds only when a is below b by more than 1% of
|b| ("a > b" likewise): a tie within rounding and run-to-run noise decides nothing."""


def _lt(a: float, b: float) -> bool:
    return a < b - MARGIN * abs(b)


def _gt(a: float, b: float) -> bool:
    return a > b + MARGIN * abs(b)



def _fmt_kind(x: float, kind) -> str:
    return _pct(x) if kind == "pct" else _fmt(x, 3 if kind is None else int(kind))


def _spread(xs: list[float], kind) -> str:
    """One value, or the median and [min, max] over seeds (non-finite values counted)."""
    finite = [x for x in xs if x is not None and math.isfinite(x)]
    if not finite:
        return "n/a"
    if len(xs) == 1:
        return _fmt_kind(finite[0], kind)
    text = (f"{_fmt_kind(statistics.median(finite), kind)} [{_fmt_kind(min(finite), kind)}, "
            f"{_fmt_kind(max(finite), kind)}]")
    return text + (f" ({len(xs) - len(finite)} n/a)" if len(finite) < len(xs) else "")


# ----------------------------------------------------------------------------- causes
# When a claim fails in a seed, the report says why beside the verdict, with numbers computed
# from the same runs. A cause is one of: (a) scale: the quick setup is smaller or shorter than
# the paper's and the effect needs more (docs/scale-checks.md has larger runs on the CPU);
# (b) criterion: the test cannot read what it is meant to; (c) implementation: the probe or
# layer, checked against the paper's definition.

CHANCE_LOSS = math.log(10)
"""Cross-entropy of a 10-class network at chance."""


def _failing(row: dict) -> list[int]:
    return [p["seed"] for p in row["per_seed"] if p["held"] == "not held"]


def _on_plateau(rec: dict) -> bool:
    """A landscape probe of a network still at chance level (loss within 5% of ln 10)."""
    return rec["loss"] >= 0.95 * CHANCE_LOSS


def _probe_value(rec: dict, key: str) -> float:
    return rec["loss_max"] - rec["loss_min"] if key == "loss_band" else rec[key]



def _landscape_pair(runs, model, lr):
    return _g(runs, model, "none", lr), _g(runs, model, "batchnorm", lr)


def _landscape_medians(runs, model, lr, *keys, direction="gradient"):
    """Per key, the (standard, BN) medians over the landscape probes along ``direction``;
    None where either network's runs or probes are missing."""
    std, bn = _landscape_pair(runs, model, lr)
    if not (std and bn and std.of("landscape", direction=direction)):
        return None
    return [tuple(landscape_median(r, key, direction) for r in (std, bn)) for key in keys]


def _fit_step(run: Run, loss: float = 0.05):
    """The first logged step with minibatch loss below ``loss`` (None: never)."""
    return next((r["step"] for r in run.of("train") if r["loss"] < loss), None)


def _act_std(run: Run, step: int = 0) -> list[float]:
    """Standard deviations of the sampled units' activations at ``step``."""
    return [math.sqrt(v) for r in run.of("act", step=step) for v in r["var"]]


