"""The claims about training (Figs. 1, 2, 7, 8, 13, 14: claims 1-5, 13-15, 17): accuracy,
noisy BatchNorm, l_p normalizations' training and activations, each with the cause shown when
a seed does not hold it."""

from __future__ import annotations

import math

from . import measures as ms
from .measures import Measured, early_train_acc, final_test_acc, final_train, moment_shift, param
from .plots import LABELS


def _c_train_faster(runs, s):
    std, bn = ms._g(runs, "vgg", "none", s.vgg.lr), ms._g(runs, "vgg", "batchnorm", s.vgg.lr)
    if not (std and bn):
        return ms._missing()
    a, b = early_train_acc(std, s.early_step), early_train_acc(bn, s.early_step)
    return Measured(f"lr {s.vgg.lr:g}, mean train acc over steps 0-{s.early_step}: standard "
                    "$std, BN $bn; at the end: $std_end vs $bn_end",
                    {"std": a, "bn": b, "std_end": final_train(std), "bn_end": final_train(bn)},
                    ms._gt(b, a) if ms._ok(a, b) else None, dict.fromkeys(("std", "bn", "std_end",
                                                                 "bn_end"), "pct"))


def _c_test(runs, s):
    std, bn = ms._g(runs, "vgg", "none", s.vgg.lr), ms._g(runs, "vgg", "batchnorm", s.vgg.lr)
    if not (std and bn):
        return ms._missing()
    a, b = final_test_acc(std), final_test_acc(bn)
    return Measured(f"lr {s.vgg.lr:g}, final test acc: standard $std, BN $bn", {"std": a, "bn": b},
                    ms._gt(b, a) if ms._ok(a, b) else None, {"std": "pct", "bn": "pct"})


def _c_high_lr(runs, s):
    lr = s.vgg_high_lr
    std, bn = ms._g(runs, "vgg", "none", lr), ms._g(runs, "vgg", "batchnorm", lr)
    if not (std and bn):
        return ms._missing()
    a, b = final_test_acc(std), final_test_acc(bn)
    return Measured(f"lr {lr:g}: final test acc standard $std, BN $bn (train $std_tr vs "
                    "$bn_tr)", {"std": a, "bn": b, "std_tr": final_train(std),
                                "bn_tr": final_train(bn)},
                    (a < param(3, "std_max") and b > a + param(3, "gap")) if ms._ok(a, b) else None,
                    dict.fromkeys(("std", "bn", "std_tr", "bn_tr"), "pct"))


def _c_noisy_trains(runs, s):
    std, bn, noisy = (ms._g(runs, "vgg", n, s.vgg.lr) for n in ("none", "batchnorm", "noisy"))
    if not (std and bn and noisy):
        return ms._missing()
    a, b, c = (early_train_acc(r, s.early_step) for r in (std, bn, noisy))
    return Measured(f"mean train acc over steps 0-{s.early_step}: standard $std, BN $bn, "
                    "noisy BN $noisy", {"std": a, "bn": b, "noisy": c},
                    (ms._gt(c, a) and b - c <= param(4, "max_gap")) if ms._ok(a, b, c) else None,
                    dict.fromkeys(("std", "bn", "noisy"), "pct"))


def _c_noisy_unstable(runs, s):
    std, bn, noisy = (ms._g(runs, "vgg", n, s.vgg.lr) for n in ("none", "batchnorm", "noisy"))
    if not (std and bn and noisy):
        return ms._missing()
    a, b, c = (moment_shift(r) for r in (std, bn, noisy))
    return Measured("median step-to-step |d mean| + |d std|: standard $std, BN $bn, noisy BN "
                    "$noisy", {"std": a, "bn": b, "noisy": c},
                    ms._gt(c, param(5, "factor") * a) if ms._ok(a, c) else None)



def _c_lp_vgg(runs, s):
    bn = ms._g(runs, "vgg", "batchnorm", s.vgg.lr)
    std = ms._g(runs, "vgg", "none", s.vgg.lr)
    lps = {n: ms._g(runs, "vgg", n, s.vgg.lr) for n in ("l1", "l2", "linf")}
    if not (bn and std and all(lps.values())):
        return ms._missing()
    ref = final_test_acc(bn)
    acc = {n: final_test_acc(r) for n, r in lps.items()}
    early = {n: early_train_acc(r, s.early_step) for n, r in lps.items()}
    std_early = early_train_acc(std, s.early_step)
    ok = ms._ok(ref, std_early, *acc.values(), *early.values())
    bn_early = early_train_acc(bn, s.early_step)
    ok = ok and ms._ok(bn_early)
    held = (all(abs(a - ref) <= param(13, "test_gap") for a in acc.values())
            and all(bn_early - e <= param(13, "early_gap") for e in early.values())
            and all(ms._gt(e, std_early) for e in early.values())) if ok else None
    values = {"bn": ref, **acc, "std_early": std_early, "bn_early": bn_early,
              **{f"{n}_early": v for n, v in early.items()}}
    return Measured("final test acc: BN $bn, " + ", ".join(f"{n} ${n}" for n in lps) +
                    "; early train acc: standard $std_early, BN $bn_early, " +
                    ", ".join(f"{n} ${n}_early" for n in lps),
                    values, held, dict.fromkeys(values, "pct"))


def _dln_final(runs, s) -> dict[str, float]:
    out = {}
    for n in ("none", "batchnorm", "l1", "l2", "linf"):
        r = ms._g(runs, "dln", n, s.dln.lr)
        if r is not None and r.of("train"):
            out[n] = r.of("train")[-1]["loss"]
    return out


def _c_lp_dln_beat_std(runs, s):
    f = _dln_final(runs, s)
    if len(f) < 5:
        return ms._missing()
    held = all(ms._lt(f[n], f["none"]) for n in ("batchnorm", "l1", "l2", "linf")) \
        if ms._ok(*f.values()) else None
    steps = ms._g(runs, "dln", "none", s.dln.lr).config.steps
    return Measured(f"final loss after {steps} steps: " +
                    ", ".join(f"{LABELS[n].replace('Standard + ', '')} ${n}" for n in f),
                    dict(f), held)


def _c_l1_beats_bn(runs, s):
    f = _dln_final(runs, s)
    if "l1" not in f or "batchnorm" not in f:
        return ms._missing()
    return Measured("final loss: l1 $l1, BN $bn", {"l1": f["l1"], "bn": f["batchnorm"]},
                    f["l1"] < f["batchnorm"] / param(15, "factor")
                    if ms._ok(f["l1"], f["batchnorm"]) else None,
                    {"l1": 4, "bn": 4})


def _c_lp_shift(runs, s):
    std = ms._g(runs, "vgg", "none", s.vgg.lr)
    lps = {n: ms._g(runs, "vgg", n, s.vgg.lr) for n in ("l1", "l2", "linf")}
    if not (std and all(lps.values())):
        return ms._missing()
    a = moment_shift(std, "act_in")
    vals = {n: moment_shift(r, "act_in") for n, r in lps.items()}
    out = {f"{n}_out": moment_shift(r) for n, r in lps.items()}
    held = all(ms._gt(v, a) for v in vals.values()) if ms._ok(a, *vals.values()) else None
    held_out = all(ms._gt(v, a) for v in out.values()) if ms._ok(a, *out.values()) else None
    flip = ("" if held is None or held_out is None or held == held_out else
            f" (the verdict differs between the sites: {'held' if held else 'not held'} at "
            f"the input, {'held' if held_out else 'not held'} at the output)")
    return Measured("median step-to-step |d mean| + |d std| at the normalization's input (the "
                    "layer input, the paper's site): standard $std, " +
                    ", ".join(f"{n} ${n}" for n in vals) + "; at its output: " +
                    ", ".join(f"{n} ${n}_out" for n in vals) + flip,
                    {"std": a, **vals, **out}, held)



def _cause_test(by_seed, s, row):
    parts, ceiling = [], True
    for seed in ms._failing(row):
        runs = by_seed[seed]
        std, bn = (ms._g(runs, "vgg", n, s.vgg.lr) for n in ("none", "batchnorm"))
        a, b = final_test_acc(std), final_test_acc(bn)
        ma, mb = (ms._mean(r["acc"] for r in run.of("test")) for run in (std, bn))
        ceiling = ceiling and ms._ok(a, b) and min(a, b) >= 0.95
        parts.append(f"seed {seed}: final test accuracy standard {ms._pct(a)} vs BN "
                     f"{ms._pct(b)}; mean over the test evaluations during training "
                     f"{ms._pct(ma)} vs {ms._pct(mb)}")
    head = ("(a) scale: the bundled digits are too easy to separate the two at the end: both "
            "networks reach >= 95% test accuracy, where the 1% margin decides nothing; the "
            "paper's 2.9-point gap is on CIFAR-10, far from its ceiling. "
            if ceiling else "not explained by a ceiling: ")
    return head + "; ".join(parts)



def _cause_l1_bn(by_seed, s, row):
    r1, r2, init = [], [], []
    for seed in sorted(by_seed):
        f = _dln_final(by_seed[seed], s)
        if {"l1", "l2", "batchnorm"} <= set(f):
            r1.append(f["l1"] / f["batchnorm"])
            r2.append(f["l2"] / f["batchnorm"])
        l1, bn = (ms._g(by_seed[seed], "dln", n, s.dln.lr) for n in ("l1", "batchnorm"))
        a, b = (ms._act_std(r) if r else [] for r in (l1, bn))
        if a and len(a) == len(b):
            init.append(ms._median(x / y for x, y in zip(a, b) if y > 0))
    measured = (f"final loss l1 / BN {ms._spread(r1, 3)}, l2 / BN {ms._spread(r2, 3)} over the "
                "seeds"
                + (f"; at initialization the l1 layer's output is {ms._spread(init, 4)} times BN's "
                   f"(sqrt(pi/2) = {math.sqrt(math.pi / 2):.4f})" if init else ""))
    return ("(c) checked against the paper's definition, no mismatch, and not a matter of "
            "scale: the DLN's inputs are zero-mean Gaussian and its layers linear, so every "
            "activation is zero-mean Gaussian, for which mean |x| = sqrt(2/pi) std and "
            "sqrt(mean x^2) = std: the l1 layer computes BatchNorm times sqrt(pi/2) and the l2 "
            "layer BatchNorm itself, and the next normalization undoes a constant factor. "
            f"Measured: {measured}; they stay equal at the paper's 10,000 steps "
            "(docs/scale-checks.md). The paper's l1 DLN (4.8x below BN) must differ from its "
            "description in something it does not state.")


def _cause_lp_shift(by_seed, s, row):
    parts = []
    for seed in ms._failing(row):
        runs = by_seed[seed]
        std = ms._g(runs, "vgg", "none", s.vgg.lr)
        lps = {n: ms._g(runs, "vgg", n, s.vgg.lr) for n in ("l1", "l2", "linf")}

        def growth(run):
            first = ms._act_std(run, 0)
            last_step = max(r["step"] for r in run.of("act"))
            return ms._median(b / a for a, b in zip(first, ms._act_std(run, last_step)) if a > 0)

        fit = {n: next((r["step"] for r in run.of("train") if r["loss"] < 0.05), None)
               for n, run in lps.items()}
        parts.append(f"seed {seed}: sampled activations' std, end / start: standard "
                     f"{ms._fmt(growth(std))}x, " + ", ".join(f"{n} {ms._fmt(growth(r))}x"
                                                         for n, r in lps.items())
                     + "; minibatch loss first < 0.05 at step " +
                     ", ".join(f"{n} {fit[n]}" for n in lps))
    return ("(a) scale: the standard network's activations grow from the vanishing scale of its "
            "Glorot initialization while it learns, and the normalized networks fit the digits "
            "within a few dozen steps, after which their activations barely move; the paper "
            "trains 15,000 steps on CIFAR-10, where they keep learning. " + "; ".join(parts))


