"""Every claim of the paper checked here (:data:`CLAIMS`), the verdict over seeds and the
claims.json rows."""

from __future__ import annotations

import math
import string

from .claims_landscape import (
    _c_beta,
    _c_dln_smooth,
    _c_hessian,
    _c_ics_dln,
    _c_ics_vgg,
    _c_loss_band,
    _c_lp_smooth,
    _c_predictive,
    _c_random,
    _cause_dln_smooth,
    _cause_hessian,
    _cause_ics_dln,
    _cause_lp_smooth,
    _cause_plateau,
)
from .claims_training import (
    _c_high_lr,
    _c_l1_beats_bn,
    _c_lp_dln_beat_std,
    _c_lp_shift,
    _c_lp_vgg,
    _c_noisy_trains,
    _c_noisy_unstable,
    _c_test,
    _c_train_faster,
    _cause_l1_bn,
    _cause_lp_shift,
    _cause_test,
)
from .measures import (
    CRITERIA,
    Claim,
    Measured,
    _fmt_kind,
    _spread,
)
from .plots import Run, seed_groups
from .suite import SuiteConfig

_CHECKS = [  # (check, cause) of claims 1, 2, ... in the criteria file's order
    (_c_train_faster, None),
    (_c_test, _cause_test),
    (_c_high_lr, None),
    (_c_noisy_trains, None),
    (_c_noisy_unstable, None),
    (_c_ics_vgg, None),
    (_c_ics_dln, _cause_ics_dln),
    (_c_loss_band, _cause_plateau("loss_band")),
    (_c_predictive, _cause_plateau("grad_diff_max")),
    (_c_beta, _cause_plateau("beta_smoothness")),
    (_c_random, _cause_plateau("loss_band", "random")),
    (_c_dln_smooth, _cause_dln_smooth),
    (_c_lp_vgg, None),
    (_c_lp_dln_beat_std, None),
    (_c_l1_beats_bn, _cause_l1_bn),
    (_c_lp_smooth, _cause_lp_smooth),
    (_c_lp_shift, _cause_lp_shift),
    (_c_hessian, _cause_hessian),
]


def _claim(i: int, check, cause) -> Claim:
    c = CRITERIA["claims"][str(i)]
    return Claim(c["statement"], c["figure"], c["paper"], c["criterion"], check, cause,
                 weak=c.get("weak"), matched=i in MATCHED)


MATCHED = (6, 8, 9, 10, 11, 12, 16)
"""Claims decided at equal steps (the paper's protocol) and at matched training loss."""

CLAIMS: list[Claim] = [_claim(i, check, cause) for i, (check, cause) in enumerate(_CHECKS, 1)]


def verdict(held_in: int, measured_in: int) -> str:
    """"held" when at least two thirds of the measured seeds held the claim, "not held" when
    at least two thirds did not, "mixed" in between, "not measured" with no seed."""
    if measured_in == 0:
        return "not measured"
    need = math.ceil(2 * measured_in / 3)
    if held_in >= need:
        return "held"
    if measured_in - held_in >= need:
        return "not held"
    return "mixed"



_HELD = {True: "held", False: "not held", None: "not measured"}


def _text(m: Measured) -> str:
    return string.Template(m.text).safe_substitute(
        {k: _fmt_kind(v, m.kinds.get(k)) for k, v in m.values.items()})


def aggregate(per_seed: list[tuple[int, Measured]]) -> dict:
    """The claims.json fields of one claim from its per-seed measurements; where the seeds
    carry a matched-loss measurement (:attr:`Measured.matched`), the same fields for it under
    ``matched`` (and each seed's under ``per_seed[i]["matched"]``)."""
    measured = [m for _, m in per_seed if m.held is not None]
    with_values = [m for _, m in per_seed if m.values]
    if with_values:
        first = with_values[0]
        text = string.Template(first.text).safe_substitute(
            {k: _spread([m.values.get(k, math.nan) for m in with_values], first.kinds.get(k))
             for k in first.values})
    else:
        text = per_seed[0][1].text if per_seed else "runs missing"
    held_in = sum(bool(m.held) for m in measured)
    out = {
        "measured": text, "held": verdict(held_in, len(measured)), "seeds": len(per_seed),
        "held_in": held_in, "measured_in": len(measured),
        "per_seed": [{"seed": seed, "held": _HELD[m.held], "values": m.values,
                      "measured": _text(m)} for seed, m in per_seed],
    }
    matched = [(seed, m.matched) for seed, m in per_seed if m.matched is not None]
    if matched:
        sub = aggregate(matched)
        out["matched"] = {k: sub[k] for k in ("measured", "held", "held_in", "measured_in")}
        for p, (_, m) in zip(out["per_seed"], ((s, m) for s, m in per_seed)):
            if m.matched is not None:
                p["matched"] = {"held": _HELD[m.matched.held], "values": m.matched.values,
                                "measured": _text(m.matched)}
    return out


def evaluate_claims(runs: dict[str, Run], suite: SuiteConfig) -> list[dict]:
    """Every claim, checked on each seed's runs and aggregated (see :func:`aggregate`)."""
    groups = seed_groups(runs)
    seeds = sorted({r.config.seed for r in runs.values()}) or list(suite.seeds)
    by_seed = {seed: {name: r for name, rs in groups.items() for r in rs
                      if r.config.seed == seed} for seed in seeds}
    rows = []
    for i, c in enumerate(CLAIMS, start=1):
        per_seed = []
        for seed in seeds:
            try:
                m = c.check(by_seed[seed], suite)
            except (KeyError, IndexError, ZeroDivisionError, ValueError) as e:
                m = Measured(f"could not measure: {type(e).__name__}: {e}")
            per_seed.append((seed, m))
        row = {"id": i, "claim": c.text, "figure": c.figure, "paper": c.paper,
               "criterion": c.criterion, "weak": c.weak, **aggregate(per_seed)}
        row["cause"] = explain(c, row, by_seed, suite)
        rows.append(row)
    return rows


def explain(claim: Claim, row: dict, by_seed: dict[int, dict[str, Run]],
            suite: SuiteConfig) -> str | None:
    """Why ``claim`` did not hold in every seed where it was measured (None when it did):
    its ``cause`` function's text, with the numbers that show it."""
    if row["measured_in"] == 0 or row["held_in"] == row["measured_in"]:
        return None
    if claim.cause is None:
        return "no cause identified"
    try:
        return claim.cause(by_seed, suite, row)
    except (AttributeError, KeyError, IndexError, TypeError, ZeroDivisionError,
            ValueError) as e:  # a run the cause reads is missing or incomplete
        return f"could not compute the cause: {type(e).__name__}: {e}"


