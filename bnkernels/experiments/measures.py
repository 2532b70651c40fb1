"""What the claims read from the saved runs: the measurements (medians over a run's records),
one seed's result of a check (:class:`Measured`), how a claim is described (:class:`Claim`),
the comparisons with their margin, and the formatting of numbers."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    """Median over a run's measurements of |top Hessian eigenvalue| (the eigenvalue of
    largest magnitude): the Hessian's spectral norm, the local beta."""
    return _median(abs(r["top_eigenvalue"]) for r in run.of("hessian"))


def moment_shift(run: Run, kind: str = "act") -> float:
    """Median over sampled units and step pairs of |change of mean| + |change of std| between
    successive steps (Figs. 7, 8, 14), at the normalization's output (``kind="act"``) or its
    input (``"act_in"``; the standard network's one site for both)."""
    out = []
    for layer in run.config.act_layers:
        recs = run.of(kind, layer=layer)
        if not recs and kind == "act_in" and run.config.norm == "none":
            recs = run.of("act", layer=layer)  # no normalization: one site
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
    matched: Measured | None = None  # the same criterion at matched training loss


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
    weak: str | None = None  # why the criterion cannot fail (or fails off the mechanism)
    matched: bool = False  # also decided at matched training loss (Measured.matched)


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


CRITERIA_FILE = Path(__file__).with_name("criteria.json")
CRITERIA: dict = json.loads(CRITERIA_FILE.read_text(encoding="utf-8"))
"""The criteria file: per claim its statement, the paper's figure and number, the
measurement, window, criterion, thresholds (``params``), reason and ``weak`` mark, and the
dated change log (see ``criteria.json``'s ``about``)."""


def param(claim: int, name: str) -> float:
    """A threshold of claim ``claim`` from the criteria file."""
    return CRITERIA["claims"][str(claim)]["params"][name]


MARGIN = CRITERIA["margin"]
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




# ----------------------------------------------------------------------------- matched loss
# The control beside the paper's protocol: two networks compared where their training losses
# agree. Probe magnitudes scale with the gradient, and at equal steps a network that has fit
# the data is compared with one that has not; at matched loss both are at the same stage.

MIN_MATCHED = 2
"""Probes each network needs inside the shared loss range for a matched-loss verdict."""


def train_loss_at(run: Run, step: int) -> float:
    """The training loss logged last at or before ``step`` (the first one if none is)."""
    recs = run.of("train")
    if not recs:
        return math.nan
    best = recs[0]
    for r in recs:
        if r["step"] > step:
            break
        best = r
    return best["loss"]


def _loss_of(rec: dict, run: Run) -> float:
    """The training loss at a record: the loss at w a landscape probe holds, else the
    training loss logged at its step."""
    return rec["loss"] if "loss" in rec else train_loss_at(run, rec["step"])


def matched_medians(a: Run, b: Run, kind: str, value: Callable[[dict], float],
                    **filters) -> dict | None:
    """``value`` of runs ``a`` and ``b`` compared where their training losses agree: the
    ``kind`` records (with ``filters``, as :meth:`Run.of`) whose training loss lies in the
    range both runs' records cover are paired, each with the other run's record of nearest
    log-loss (from both sides), and the medians over the pairs returned as ``a`` and ``b``,
    with the range ``lo``, ``hi``, the records of each run in it ``n_a``, ``n_b`` and the
    ``pairs``. None when the ranges do not overlap or either run has fewer than
    :data:`MIN_MATCHED` records in it."""
    def inside(run):
        recs = [(_loss_of(r, run), r) for r in run.of(kind, **filters)]
        return [(x, r) for x, r in recs if math.isfinite(x) and x > 0]

    ra, rb = inside(a), inside(b)
    if not ra or not rb:
        return None
    lo = max(min(x for x, _ in ra), min(x for x, _ in rb))
    hi = min(max(x for x, _ in ra), max(x for x, _ in rb))
    ra = [(x, r) for x, r in ra if lo <= x <= hi]
    rb = [(x, r) for x, r in rb if lo <= x <= hi]
    if len(ra) < MIN_MATCHED or len(rb) < MIN_MATCHED:
        return None

    def nearest(x, recs):
        return min(recs, key=lambda t: abs(math.log(t[0] / x)))[1]

    pairs = {(id(r), id(nearest(x, rb))): (r, nearest(x, rb)) for x, r in ra}
    pairs.update({(id(nearest(x, ra)), id(r)): (nearest(x, ra), r) for x, r in rb})
    return {"a": _median(value(p) for p, _ in pairs.values()),
            "b": _median(value(q) for _, q in pairs.values()),
            "lo": lo, "hi": hi, "n_a": len(ra), "n_b": len(rb), "pairs": len(pairs)}


def matched_measured(a: Run, b: Run, kind: str, value: Callable[[dict], float],
                     held: Callable[[float, float], bool], names=("std", "bn"),
                     **filters) -> Measured:
    """The matched-loss :class:`Measured` of a comparison of runs ``a`` and ``b``: ``held``
    is the equal-step criterion applied to the matched medians."""
    m = matched_medians(a, b, kind, value, **filters)
    if m is None:
        return Measured("no overlapping training-loss range with enough probes")
    x, y = names
    ok = _ok(m["a"], m["b"])
    return Measured(f"over $pairs pairs of records at the nearest training loss, in [$lo, $hi] "
                    f"($n_{x} vs $n_{y} records in the range): ${x} vs ${y}",
                    {x: m["a"], y: m["b"], "lo": m["lo"], "hi": m["hi"], f"n_{x}": m["n_a"],
                     f"n_{y}": m["n_b"], "pairs": m["pairs"]},
                    held(m["a"], m["b"]) if ok else None,
                    {f"n_{x}": 3, f"n_{y}": 3, "pairs": 3})
