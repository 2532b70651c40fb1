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
    Claim,
    Measured,
    _fmt_kind,
    _spread,
)
from .plots import Run, seed_groups
from .suite import SuiteConfig

CLAIMS: list[Claim] = [
    Claim("BatchNorm makes VGG train faster (at the base lr: the paper's 0.1)", "Fig. 1a",
          "train acc at 500 steps: 36% standard vs 68% BN; 2k: 70% vs 89%",
          "BN's mean early training accuracy > the standard network's", _c_train_faster),
    Claim("BatchNorm improves test accuracy (at the base lr)", "Fig. 1b",
          "80.0% standard vs 82.9% BN (CIFAR-10, no augmentation)",
          "BN's final test accuracy > the standard network's", _c_test, _cause_test),
    Claim("At lr 0.5 the standard VGG fails to train while BatchNorm trains", "Fig. 1",
          "test acc 10% standard vs 80.2% BN",
          "standard < 20% and BN > standard + 30 points (final test accuracy)", _c_high_lr),
    Claim('"Noisy" BatchNorm (severe covariate shift) trains nearly as well as BatchNorm, '
          "and better than the standard network", "Fig. 2",
          "train acc at 500 steps: 64% noisy vs 68% BN vs 36% standard",
          "noisy > standard, and BN - noisy <= 10 points (mean early training accuracy)",
          _c_noisy_trains),
    Claim('"Noisy" BatchNorm\'s activations are less stable than even the standard '
          "network's", "Figs. 2, 7, 8",
          "step-to-step change of mean: up to ~1.0 noisy, ~0.01-0.14 standard, < 0.01 BN",
          "noisy's median step-to-step moment change > the standard network's",
          _c_noisy_unstable),
    Claim("BatchNorm does not reduce ICS (Definition 2.1) in VGG: similar or worse",
          "Fig. 3 (VGG)",
          "layer #5: cos ~0.6-0.8 standard vs ~0.5-0.7 BN; l2 ~0.2-0.9 vs ~0.7-3.7",
          "BN's mean cos(G, G') <= standard's + 0.05", _c_ics_vgg),
    Claim("In the DLN the standard network has almost no ICS while BN's G and G' are "
          "nearly uncorrelated", "Fig. 3 (DLN)",
          "lr 1e-7: cos ~1 standard; BN cos swings over [-1, 1], l2 ~1e3-1e4",
          "standard mean cos > 0.9 and BN mean cos < 0.5", _c_ics_dln, _cause_ics_dln),
    Claim("BatchNorm makes the loss change less along the gradient (Lipschitzness)",
          "Fig. 4a", "loss band at step 1k: [2.6, 8.1] standard vs [1.85, 2.74] BN; at 10k: "
          "[0.97, 2.3] vs [0.90, 1.0]",
          "BN's median band width < standard's (probes over the whole run, as in the figure)",
          _c_loss_band, _cause_plateau("loss_band")),
    Claim("BatchNorm makes gradients more predictive", "Fig. 4b",
          '"close to two orders of magnitude" (text); ~5-10x in the figure\'s upper band',
          "BN's median upper band < standard's (probes over the whole run)", _c_predictive,
          _cause_plateau("grad_diff_max")),
    Claim('BatchNorm lowers the "effective" beta-smoothness', "Fig. 4c",
          "~19-23 standard (spikes to 45) vs ~16-20 BN",
          "BN's median < standard's", _c_beta, _cause_plateau("beta_smoothness")),
    Claim("The loss behaves similarly along random directions", "Sec. 3.2",
          "stated in the text (about the loss), no figure",
          "BN's median loss band < standard's along random directions", _c_random,
          _cause_plateau("loss_band", "random")),
    Claim("BatchNorm smooths the deep linear network's landscape too", "Fig. 9",
          ">= 3 orders of magnitude in gradient predictiveness",
          "BN's median gradient difference and beta < standard's (probes over the whole run)",
          _c_dln_smooth, _cause_dln_smooth),
    Claim("l_p normalizations train VGG comparably to BatchNorm", "Fig. 13",
          "all l_p variants comparable to BN",
          "each l_p within 5 points of BN's final test accuracy and faster than standard early",
          _c_lp_vgg),
    Claim("l_p normalizations beat the standard DLN", "Fig. 13",
          "final loss at lr 1e-6: standard 1.66e3, BN 4.8e2, l1 1.0e2, l2 4.8e2, linf 9.9e2",
          "every normalized DLN's final loss < the standard one's", _c_lp_dln_beat_std),
    Claim("l1 normalization beats BatchNorm on the DLN", "Fig. 13 / Sec. 3.3",
          "l1 1.0e2 vs BN 4.8e2", "l1's final loss < BN's", _c_l1_beats_bn, _cause_l1_bn),
    Claim("l_p normalizations smooth the landscape like BatchNorm", "Figs. 11, 12",
          "qualitative (figures)", "each l_p's median beta < the standard network's, "
          "VGG and DLN", _c_lp_smooth, _cause_lp_smooth),
    Claim("l_p normalizations shift activation distributions more than the standard network",
          "Fig. 14 / Sec. 3.3", "qualitative (figure)",
          "each l_p's median step-to-step moment change > standard's", _c_lp_shift,
          _cause_lp_shift),
    Claim("BatchNorm lowers the top Hessian eigenvalue along training (not a claim of the "
          "paper: a curvature check of its smoothness argument)", "Curvature figure (new)",
          "not measured in the paper (its Sec. 4 bounds the quadratic form along the gradient)",
          "BN's median |top eigenvalue| (the Hessian's spectral norm) over the measurements < "
          "standard's, VGG and DLN", _c_hessian, _cause_hessian),
]


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



def aggregate(per_seed: list[tuple[int, Measured]]) -> dict:
    """The claims.json fields of one claim from its per-seed measurements."""
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
    return {
        "measured": text, "held": verdict(held_in, len(measured)), "seeds": len(per_seed),
        "held_in": held_in, "measured_in": len(measured),
        "per_seed": [{"seed": seed, "held": {True: "held", False: "not held",
                                             None: "not measured"}[m.held],
                      "values": m.values,
                      "measured": string.Template(m.text).safe_substitute(
                          {k: _fmt_kind(v, m.kinds.get(k)) for k, v in m.values.items()})}
                     for seed, m in per_seed],
    }


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
               "criterion": c.criterion, **aggregate(per_seed)}
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


