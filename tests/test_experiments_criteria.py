"""Every criterion of the claims table can fail: on synthetic runs built so that the paper's
effect is there, each claim's check holds; on the opposite case (the effect reversed) it does
not. Also at matched training loss for the claims that carry that control. The criteria file
itself: a version, a dated change log, and every claim's fields."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bnkernels.experiments import claims, measures
from bnkernels.experiments.config import RunConfig
from bnkernels.experiments.plots import Run, base_name
from bnkernels.experiments.suite import SUITES

S = SUITES["quick"]
LP = ("l1", "l2", "linf")


def _world(effect: bool) -> dict[str, Run]:
    """One seed's runs of the quick suite, synthetic: with ``effect`` every claim of the
    paper is built in (BN and l_p smoother, faster, ...); without, each is reversed."""
    good = {n: n != "none" for n in ("none", "batchnorm", "noisy", *LP)}
    if not effect:
        good = {n: not g for n, g in good.items()}
    runs = {}

    def add(model, norm, lr, records, **cfg):
        runs[base_name(model, norm, lr)] = Run(base_name(model, norm, lr), Path("."),
                                               RunConfig(model=model, norm=norm, lr=lr, **cfg),
                                               records)

    vgg_steps = list(range(0, 300, 10))
    loss_at = {t: 2.3 * math.exp(-t / 60) for t in range(301)}  # the same for every network
    for norm in ("none", "batchnorm", "noisy", *LP):
        g = good[norm]
        acc = 0.95 if g else 0.3
        recs = [{"kind": "train", "step": t, "loss": loss_at[t], "acc": acc} for t in vgg_steps]
        recs.append({"kind": "test", "step": 300, "acc": 0.99 if g else 0.85})
        if norm in ("none", "batchnorm"):  # claim 6: BN's G and G' not more aligned
            cos = {"none": 0.8 if effect else 0.5, "batchnorm": 0.7 if effect else 0.9}[norm]
            recs += [{"kind": "ics", "step": t, "layer": k, "cosine": cos, "l2": 1.0}
                     for t in range(0, 300, 20) for k in (3, 6)]
        scale = 0.01 if g else 1.0
        for t in range(0, 300, 15):
            for d in ("gradient", "random"):
                recs.append({"kind": "landscape", "step": t, "direction": d,
                             "loss": loss_at[t], "loss_min": loss_at[t],
                             "loss_max": loss_at[t] + scale, "grad_diff_max": scale,
                             "beta_smoothness": 100 * scale, "betas": [scale, scale],
                             "losses": [loss_at[t]]})
        recs += [{"kind": "hessian", "step": t, "top_eigenvalue": 10.0 if g else 100.0}
                 for t in (0, 100, 200)]
        # claim 5: noisy moves more than 2x standard; claim 17: l_p more than standard
        shift = {"none": 0.1 if effect else 1.0, "batchnorm": 0.001,
                 "noisy": 1.0 if effect else 0.1}.get(norm, 0.5 if effect else 0.01)
        for t in range(0, 300, 10):
            for kind in ("act", "act_in"):
                for k, m in ((t, 0.0), (t + 1, shift)):
                    recs.append({"kind": kind, "step": k, "layer": 2, "units": [0],
                                 "mean": [m], "var": [1.0]})
        add("vgg", norm, S.vgg.lr, recs, act_layers=(2,), ics_layers=(3, 6))
    for norm in ("none", "batchnorm"):  # claim 3: the high lr
        ok = good[norm]
        add("vgg", norm, S.vgg_high_lr, [{"kind": "train", "step": 0, "loss": 1.0, "acc": 0.5},
                                         {"kind": "test", "step": 150,
                                          "acc": 0.9 if ok else 0.1}])
    for norm in ("none", "batchnorm", *LP):
        g = good[norm]
        final = {True: 100.0, False: 1e4}[g]
        if norm == "l1" and effect:
            final = 40.0  # claim 15: l1 below BN / 2
        recs = [{"kind": "train", "step": 999, "loss": final}]
        scale = 1e5 if g else 1e9
        recs += [{"kind": "landscape", "step": t, "direction": "gradient",
                  "loss": 5e4 / (1 + t), "loss_min": 1.0, "loss_max": 2.0,
                  "grad_diff_max": scale, "beta_smoothness": scale, "betas": [scale, scale],
                  "losses": [1.0]} for t in range(0, 1000, 50)]
        recs += [{"kind": "hessian", "step": t, "top_eigenvalue": 1e5 if g else 1e7}
                 for t in (0, 500)]
        add("dln", norm, S.dln.lr, recs)
    for norm in ("none", "batchnorm"):  # claim 7
        cos = {"none": 1.0 if effect else 0.5, "batchnorm": 0.2 if effect else 0.95}[norm]
        add("dln", norm, S.dln_low_lr, [{"kind": "ics", "step": t, "layer": 9, "cosine": cos,
                                         "l2": 1.0} for t in range(0, 500, 50)])
    return runs


@pytest.mark.parametrize("i", range(1, len(claims.CLAIMS) + 1))
def test_each_criterion_holds_with_the_effect_and_fails_without(i):
    c = claims.CLAIMS[i - 1]
    with_effect, without = c.check(_world(True), S), c.check(_world(False), S)
    assert with_effect.held is True, with_effect.text
    assert without.held is False, without.text
    if c.matched:
        assert with_effect.matched.held is True, with_effect.matched.text
        assert without.matched.held is False, without.matched.text


def test_matched_loss_compares_where_the_losses_agree():
    """A BN network that is only further along (its probes at lower loss, each probe's size
    proportional to the loss, the same function of the loss as the standard network's): held
    at equal steps, not at matched loss."""
    def run(norm, losses):
        recs = [{"kind": "landscape", "step": t, "direction": "gradient", "loss": x,
                 "loss_min": x, "loss_max": 1.5 * x} for t, x in enumerate(losses)]
        return Run(norm, Path("."), RunConfig(norm=norm), recs)

    std = run("none", [2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    bn = run("batchnorm", [1.4, 1.0, 0.6, 0.3, 0.2, 0.1])
    band = measures.landscape_median(std, "loss_band"), measures.landscape_median(bn,
                                                                                  "loss_band")
    assert measures._lt(band[1], band[0])  # equal steps: BN's band smaller
    m = measures.matched_medians(std, bn, "landscape",
                                 lambda r: measures._probe_value(r, "loss_band"))
    assert (m["lo"], m["hi"]) == (1.0, 1.4) and m["n_a"] == 3 and m["n_b"] == 2
    assert m["pairs"] == 3  # 1.4-1.4, 1.2-1.0 (or 1.4), 1.0-1.0
    assert m["a"] == pytest.approx(m["b"], rel=0.15)  # matched loss: (almost) no difference
    assert not measures._lt(m["b"] * 0.9, m["a"])
    far = run("batchnorm", [0.5, 0.4])
    assert measures.matched_medians(std, far, "landscape", lambda r: r["loss"]) is None


def test_the_criteria_file_has_a_version_a_change_log_and_every_field():
    crit = measures.CRITERIA
    assert crit["version"] and crit["changes"]
    for ch in crit["changes"]:
        assert {"version", "date", "after_results", "claims", "what", "reason"} <= set(ch)
    assert any(ch["after_results"] for ch in crit["changes"])
    assert [int(k) for k in crit["claims"]] == list(range(1, len(claims.CLAIMS) + 1))
    for c in crit["claims"].values():
        assert {"statement", "figure", "paper", "measurement", "window", "criterion", "params",
                "reason", "weak"} <= set(c)
        assert all(c[k] for k in ("statement", "figure", "measurement", "window", "reason"))
