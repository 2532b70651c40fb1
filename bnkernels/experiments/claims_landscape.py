"""The claims about internal covariate shift and the landscape (Figs. 3, 4, 9, 11, 12 and the
curvature figure: claims 6-12, 16, 18), each with the cause shown when a seed does not hold
it."""

from __future__ import annotations

import math

from .measures import (
    Measured,
    _failing,
    _fit_step,
    _fmt,
    _g,
    _landscape_medians,
    _landscape_pair,
    _lt,
    _mean,
    _median,
    _missing,
    _ok,
    _on_plateau,
    _probe_value,
    _spread,
    hessian_median,
    ics_mean,
    landscape_median,
    matched_measured,
    matched_medians,
    param,
)
from .plots import Run


def _c_ics_vgg(runs, s):
    std, bn = _g(runs, "vgg", "none", s.vgg.lr), _g(runs, "vgg", "batchnorm", s.vgg.lr)
    if not (std and bn and std.of("ics")):
        return _missing()
    def after(run, key):  # the records after initialization, where BN's cos is ~0
        return _mean(r[key] for r in run.of("ics") if r["step"] > 0)

    slack = param(6, "slack")
    ca, cb = after(std, "cosine"), after(bn, "cosine")
    c0a, c0b = (_mean(r["cosine"] for r in run.of("ics", step=0)) for run in (std, bn))
    layers = ", ".join(f"#{i}" for i in std.config.ics_layers)
    m = Measured(f"layers {layers}, mean cos(G, G') after initialization: standard $cos_std, "
                 "BN $cos_bn (at step 0: $cos0_std vs $cos0_bn); mean ||G - G'||: $l2_std vs "
                 "$l2_bn",
                 {"cos_std": ca, "cos_bn": cb, "cos0_std": c0a, "cos0_bn": c0b,
                  "l2_std": after(std, "l2"), "l2_bn": after(bn, "l2")},
                 cb <= ca + slack if _ok(ca, cb) else None,
                 {"cos_std": 2, "cos_bn": 2, "cos0_std": 2, "cos0_bn": 2})
    m.matched = matched_measured(std, bn, "ics", lambda r: r["cosine"],
                                 lambda a, b: b <= a + slack)
    return m


def _c_ics_dln(runs, s):
    lr = s.dln_low_lr
    std, bn = _g(runs, "dln", "none", lr), _g(runs, "dln", "batchnorm", lr)
    if not (std and bn):
        lr = s.dln.lr
        std, bn = _g(runs, "dln", "none", lr), _g(runs, "dln", "batchnorm", lr)
    if not (std and bn and std.of("ics")):
        return _missing()
    ca, cb = ics_mean(std, "cosine"), ics_mean(bn, "cosine")
    lo = min((r["cosine"] for r in bn.of("ics")), default=math.nan)
    return Measured(f"lr {lr:g}, mean cos: standard $cos_std, BN $cos_bn (BN min $bn_min); "
                    "mean ||G - G'||: $l2_std vs $l2_bn",
                    {"cos_std": ca, "cos_bn": cb, "bn_min": lo, "l2_std": ics_mean(std, "l2"),
                     "l2_bn": ics_mean(bn, "l2")},
                    (ca > param(7, "std_min") and cb < param(7, "bn_max"))
                    if _ok(ca, cb) else None,
                    {"cos_bn": 2, "bn_min": 2})



def _c_loss_band(runs, s):
    got = _landscape_medians(runs, "vgg", s.vgg.lr, "loss_band", "loss")
    if got is None:
        return _missing()
    (a, b), (la, lb) = got
    return _with_matched(runs, "vgg", s.vgg.lr, "loss_band", Measured(
        "median loss-band width (max - min) over the probes: standard $std, BN $bn "
        "(median loss at the probed weights: $loss_std vs $loss_bn; chance level ln 10 = 2.30)",
        {"std": a, "bn": b, "loss_std": la, "loss_bn": lb}, _lt(b, a) if _ok(a, b) else None))


def _c_predictive(runs, s):
    got = _landscape_medians(runs, "vgg", s.vgg.lr, "grad_diff_max")
    if got is None:
        return _missing()
    (a, b), = got
    ratio = a / b if _ok(a, b) and b > 0 else math.nan
    return _with_matched(runs, "vgg", s.vgg.lr, "grad_diff_max", Measured(
        "median upper band of ||grad L(w) - grad L(w - eta g)|| over the probes: "
        "standard $std, BN $bn: ${ratio}x",
        {"std": a, "bn": b, "ratio": ratio}, _lt(b, a) if _ok(a, b) else None, {"ratio": 2}))


def _c_beta(runs, s):
    got = _landscape_medians(runs, "vgg", s.vgg.lr, "beta_smoothness")
    if got is None:
        return _missing()
    (a, b), = got
    return _with_matched(runs, "vgg", s.vgg.lr, "beta_smoothness", Measured(
        "median effective beta-smoothness: standard $std, BN $bn",
        {"std": a, "bn": b}, _lt(b, a) if _ok(a, b) else None))


def _c_random(runs, s):
    got = _landscape_medians(runs, "vgg", s.vgg.lr, "loss_band", "beta_smoothness",
                             direction="random")
    if got is None:
        return _missing("not probed (landscape_directions lacks 'random')")
    (a, b), (c, d) = got
    return _with_matched(runs, "vgg", s.vgg.lr, "loss_band", Measured(
        "random directions: median loss-band width standard $band_std, BN "
        "$band_bn (median beta, not part of the claim: $beta_std vs $beta_bn)",
        {"band_std": a, "band_bn": b, "beta_std": c, "beta_bn": d},
        _lt(b, a) if _ok(a, b) else None), direction="random")


def _c_dln_smooth(runs, s):
    got = _landscape_medians(runs, "dln", s.dln.lr, "grad_diff_max", "beta_smoothness")
    if got is None:
        return _missing()
    (a, b), (c, d) = got
    orders = math.log10(a / b) if _ok(a, b) and a > 0 and b > 0 else math.nan
    need = param(12, "min_orders")

    def held(x, y):
        return x > 0 and y > 0 and math.log10(x / y) >= need

    m = Measured("median grad-difference upper band over the probes: standard $gd_std, "
                 "BN $gd_bn ($orders orders of magnitude); median beta $beta_std vs $beta_bn",
                 {"gd_std": a, "gd_bn": b, "orders": orders, "beta_std": c, "beta_bn": d},
                 (held(a, b) and _lt(d, c)) if _ok(a, b, c, d) else None, {"orders": 2})
    std, bn = _landscape_pair(runs, "dln", s.dln.lr)
    m.matched = matched_measured(std, bn, "landscape", lambda r: r["grad_diff_max"], held,
                                 direction="gradient")
    return m


def _with_matched(runs, model, lr, key, m: Measured, direction="gradient") -> Measured:
    """``m`` with its matched-loss verdict: the standard and BN probes along ``direction``
    whose training loss lies in the range both cover, compared by "BN's median < standard's"
    on ``key``."""
    std, bn = _landscape_pair(runs, model, lr)
    m.matched = matched_measured(std, bn, "landscape", lambda r: _probe_value(r, key),
                                 lambda a, b: _lt(b, a), direction=direction)
    return m



def _c_lp_smooth(runs, s):
    parts, values, held = [], {}, True
    for model, lr in (("vgg", s.vgg.lr), ("dln", s.dln.lr)):
        std = _g(runs, model, "none", lr)
        if std is None or not std.of("landscape"):
            return _missing()
        a = landscape_median(std, "beta_smoothness")
        vals = {}
        for n in ("l1", "l2", "linf"):
            r = _g(runs, model, n, lr)
            if r is None:
                return _missing()
            vals[n] = landscape_median(r, "beta_smoothness")
        if not _ok(a, *vals.values()):
            held = None
        elif held is not None:
            held = held and all(_lt(v, a) for v in vals.values())
        values[f"{model}_std"] = a
        values.update({f"{model}_{n}": v for n, v in vals.items()})
        parts.append(f"{model.upper()} median beta: standard ${model}_std, " +
                     ", ".join(f"{n} ${model}_{n}" for n in vals))
    m = Measured("; ".join(parts), values, held)
    m.matched = _lp_smooth_matched(runs, s)
    return m


def _lp_smooth_matched(runs, s) -> Measured:
    """Claim 16 at matched training loss: each l_p network against the standard one, its
    probes and the standard's in the loss range both cover."""
    parts, values, held = [], {}, True
    for model, lr in (("vgg", s.vgg.lr), ("dln", s.dln.lr)):
        std = _g(runs, model, "none", lr)
        for n in ("l1", "l2", "linf"):
            got = matched_medians(std, _g(runs, model, n, lr), "landscape",
                                  lambda r: r["beta_smoothness"], direction="gradient")
            if got is None or not _ok(got["a"], got["b"]):
                held = None
                parts.append(f"{model.upper()} {n}: no overlap")
                continue
            if held is not None:
                held = held and _lt(got["b"], got["a"])
            values[f"{model}_{n}"], values[f"{model}_{n}_std"] = got["b"], got["a"]
            parts.append(f"{model.upper()} {n} ${model}_{n} vs standard ${model}_{n}_std")
    return Measured("matched-loss median beta: " + ", ".join(parts), values, held)



def _c_hessian(runs, s):
    parts, values, held = [], {}, True
    for model, lr in (("vgg", s.vgg.lr), ("dln", s.dln.lr)):
        std, bn = _landscape_pair(runs, model, lr)
        if not (std and bn and std.of("hessian")):
            return _missing("not measured (hessian_every = 0)")
        a, b = hessian_median(std), hessian_median(bn)
        if not _ok(a, b):
            held = None
        elif held is not None:
            held = held and _lt(b, a)
        vals = {"std": a, "bn": b}
        for n in ("l1", "l2", "linf"):
            r = _g(runs, model, n, lr)
            if r is not None and r.of("hessian"):
                vals[n] = hessian_median(r)
        values.update({f"{model}_{k}": v for k, v in vals.items()})
        names = {"std": "standard", "bn": "BN"}
        parts.append(f"{model.upper()} median |top eigenvalue|: " +
                     ", ".join(f"{names.get(k, k)} ${model}_{k}" for k in vals))
    return Measured("; ".join(parts), values, held)



def _cause_plateau(key: str, direction: str = "gradient"):
    """The standard VGG on its initial chance-level plateau, where every direction is flat."""
    what = {"loss_band": "loss-band width", "grad_diff_max": "gradient-difference upper band",
            "beta_smoothness": "effective beta"}[key]

    def cause(by_seed, s, row):
        parts, plateau = [], True
        for seed in _failing(row):
            std, bn = _landscape_pair(by_seed[seed], "vgg", s.vgg.lr)
            recs = std.of("landscape", direction=direction)
            bn_at = {r["step"]: r for r in bn.of("landscape", direction=direction)}
            flat = [r for r in recs if _on_plateau(r)]
            live = [r for r in recs if not _on_plateau(r) and r["step"] in bn_at]
            a = _median(_probe_value(r, key) for r in live)
            b = _median(_probe_value(bn_at[r["step"]], key) for r in live)
            plateau = plateau and 4 * len(flat) >= len(recs) and _ok(a, b) and _lt(b, a)
            parts.append(f"seed {seed}: the standard network is at chance loss in {len(flat)} of "
                         f"{len(recs)} probes; at the {len(live)} others its median {what} is "
                         f"{_fmt(a)} vs BN's {_fmt(b)} at the same steps")
        head = ("(a) scale: the quick standard network starts on a chance-level plateau (the "
                "signal of a deep ReLU network at Glorot initialization vanishes), where the "
                "loss is flat in every direction and nothing is learned; the paper's leaves it "
                "within the first few percent of 15,000 steps (Fig. 1a: 36% at step 500). "
                if plateau else "not explained by the standard network's plateau: ")
        return head + "; ".join(parts)
    return cause



def _dln_ics_pair(runs, s):
    for lr in (s.dln_low_lr, s.dln.lr):
        std, bn = _g(runs, "dln", "none", lr), _g(runs, "dln", "batchnorm", lr)
        if std and bn and bn.of("ics"):
            return std, bn
    raise KeyError("no DLN run with ICS records")


def _cause_ics_dln(by_seed, s, row):
    parts = []
    for seed in _failing(row):
        std, bn = _dln_ics_pair(by_seed[seed], s)
        for layer in bn.config.ics_layers:
            cs = [r["cosine"] for r in bn.of("ics", layer=layer)]
            parts.append(f"seed {seed}, layer #{layer}: BN mean cos {_fmt(_mean(cs), 2)}, "
                         f"min {_fmt(min(cs, default=math.nan), 2)}")
        parts.append(f"seed {seed}, standard: min cos "
                     f"{_fmt(min((r['cosine'] for r in std.of('ics')), default=math.nan), 3)}")
    return ("(b) criterion: the paper's figure shows one run, and a mean over a run asks every "
            "seed's BN layers to decorrelate on average; whether a layer does varies by seed "
            "and layer, and not with the run's length (docs/scale-checks.md runs the paper's "
            "10,000 steps). Per layer: " + "; ".join(parts))


def _cause_dln_smooth(by_seed, s, row):
    parts = []
    for seed in _failing(row):
        std, bn = _landscape_pair(by_seed[seed], "dln", s.dln.lr)
        for name, run in (("standard", std), ("BN", bn)):
            recs = run.of("landscape", direction="gradient")
            blow = sum(r["losses"][-1] > 10 * r["loss"] for r in recs)
            parts.append(f"seed {seed}, {name}: the loss at the largest step exceeds 10x the "
                         f"loss at w in {blow} of {len(recs)} probes")
    return ("(a) trajectory: the standard DLN's gradient is unpredictive when a step of up to "
            "30 lr blows its 25-layer product up, which depends on where the run is; " +
            "; ".join(parts))


def _small_step_beta(run: Run) -> float:
    """Median over a run's gradient probes of the larger effective beta at its two smallest
    step lengths: the local curvature along the gradient where the gradient is smooth, far
    more where it jumps under a small move (a kink: beta ~ 1 / eta)."""
    return _median(max(r["betas"][:2]) for r in run.of("landscape", direction="gradient")
                   if r["betas"])



def _cause_lp_smooth(by_seed, s, row):
    parts, kinds = [], set()
    for seed in _failing(row):
        runs = by_seed[seed]
        for model, lr in (("vgg", s.vgg.lr), ("dln", s.dln.lr)):
            std = _g(runs, model, "none", lr)
            bn = _g(runs, model, "batchnorm", lr)
            a = landscape_median(std, "beta_smoothness")
            probes = std.of("landscape", direction="gradient")
            for n in ("l1", "l2", "linf"):
                run = _g(runs, model, n, lr)
                b = landscape_median(run, "beta_smoothness")
                if _ok(a, b) and _lt(b, a):
                    continue
                why = []
                if model == "vgg" and 4 * sum(map(_on_plateau, probes)) >= len(probes):
                    kinds.add("plateau")
                    why.append(f"the standard network is at chance loss in "
                               f"{sum(map(_on_plateau, probes))} of {len(probes)} probes")
                elif model == "vgg":
                    kinds.add("edge")
                    why.append(f"{n}'s beta x lr / 2 = {_fmt(b * lr / 2, 2)}; its minibatch "
                               f"loss first < 0.05 at step {_fit_step(run)} (BN: "
                               f"{_fit_step(bn) if bn else 'n/a'})")
                small, ref = _small_step_beta(run), _small_step_beta(bn) if bn else math.nan
                if model == "dln" and _ok(small, ref) and small > 2 * ref:
                    kinds.add("kink")
                    why.append(f"its beta at the two smallest steps {_fmt(small)} vs BN's "
                               f"{_fmt(ref)} (2 / lr = {2 / lr:g})")
                if model == "dln":
                    blow = sum(r["losses"][-1] > 10 * r["loss"] for r in probes)
                    why.append(f"the standard DLN's loss at the largest step exceeds 10x its "
                               f"loss at w in {blow} of {len(probes)} probes")
                parts.append(f"seed {seed}, {model.upper()} {n}: beta {_fmt(b)} vs standard "
                             f"{_fmt(a)}" + "".join(f"; {w}" for w in why))
    heads = []
    if "kink" in kinds:
        heads.append("(c) checked, a property of the layer the paper defines: l_inf divides by "
                     "max |x|, which is not differentiable where the arg max moves to another "
                     "sample, so its gradient jumps under an arbitrarily small step and the "
                     "effective beta (change of gradient / step length) is large at the "
                     "smallest steps; the standard DLN's beta is large only where its largest "
                     "step blows the 25-layer product up, which depends on the trajectory")
    if "edge" in kinds:
        heads.append("(b) criterion: while a network is still learning at lr its effective "
                     "beta sits near 2 / lr (the edge of stability; the paper's own Fig. 4c "
                     "values, ~16-23 at lr 0.1, are there too) and it falls once the network has "
                     "fit the data, so over a fixed run the median ranks networks by how long "
                     "they take to fit")
    if "plateau" in kinds:
        heads.append("(a) scale: the standard network sits on its chance-level plateau, flat "
                     "in every direction")
    return ("; ".join(heads) or "no cause identified") + ". " + "; ".join(parts)



def _cause_hessian(by_seed, s, row):
    edge: dict[str, list[float]] = {}
    held: dict[str, list[bool]] = {}
    for seed in sorted(by_seed):
        for model, lr in (("vgg", s.vgg.lr), ("dln", s.dln.lr)):
            std, bn = _landscape_pair(by_seed[seed], model, lr)
            if not (std and bn):
                continue
            held.setdefault(model, []).append(_lt(hessian_median(bn), hessian_median(std)))
            for name, run in (("standard", std), ("BN", bn)):
                edge.setdefault(f"{model.upper()} {name}", []).append(
                    _median(abs(r["top_eigenvalue"]) * lr / 2 for r in run.of("hessian")
                            if r["step"] > 0))
    counts = ", ".join(f"{m.upper()} in {sum(h)} of {len(h)} seeds" for m, h in held.items())
    return ("(b) criterion (not a claim of the paper): a network trained by (S)GD at lr settles "
            "at the edge of stability, where the top Hessian eigenvalue hovers near 2 / lr "
            "whatever the architecture (Cohen et al., ICLR 2021), so at a shared lr the top "
            "eigenvalue measures the lr more than the network. BN's is lower " + counts +
            ". Measured |top eigenvalue| x lr / 2 (1 = the edge; median over the measurements "
            "after initialization): " + ", ".join(f"{k} {_spread(v, 3)}" for k, v in edge.items())
            + ". The paper's smoothness is along the gradient (claims 8-10, 12), and its payoff "
            "is the larger usable lr (claim 3).")


