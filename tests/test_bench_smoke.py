"""The benchmark runner's smoke run: result schema, files, and the arithmetic of every row, of
the overhead and e2e sections and of the targets. No performance is judged here; the full GPU
run is where the goals and targets are measured.

Without a GPU the run is ``bnkernels bench --device cpu --quick`` (the reference and
interpreted Triton providers, tiny shapes). With one it is ``bnkernels bench --device cuda
--smoke``: the same tiny sizes on the GPU, every GPU provider but the torch.compile ones, both
kernel timing modes (eager and CUDA graphs). Assertions follow the providers the device has.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch

from bnkernels.benchmarking import cli as bench
from bnkernels.benchmarking import e2e as E
from bnkernels.benchmarking import models as M
from bnkernels.benchmarking import overhead as O
from bnkernels.benchmarking import providers as P
from bnkernels.benchmarking import shapes as S
from bnkernels.benchmarking import suite, targets, timing
from bnkernels.benchmarking.suite import add_speedups, row_key, summarize

# One worker runs the whole module under pytest-xdist (--dist loadgroup): one smoke run.
pytestmark = pytest.mark.xdist_group("bench-smoke")

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ARGS = ["--device", "cuda", "--smoke"] if GPU else ["--device", "cpu", "--quick"]
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

ROW_KEYS = {"op", "pass", "provider", "mode", "shape", "dtype", "layout", "median_us", "gbps",
            "frac_copy_bw", "speedup_vs_cudnn", "speedup_vs_compile"}
TOP_KEYS = {"device", "torch", "triton", "cudnn", "copy_bw_gbps", "copy_bw_method", "rows",
            "overhead", "e2e", "targets", "sections", "summary", "skipped"}
OVERHEAD_KEYS = {"op", "p", "pass", "provider", "shape", "dtype", "calls", "repeats",
                 "us_per_call", "min_us_per_call", "max_us_per_call", "baseline",
                 "ratio_vs_torch"}
E2E_KEYS = {"model", "arch", "dtype", "layout", "provider", "batch", "image", "steps",
            "median_ms", "min_ms", "max_ms", "loss_first", "loss_last", "weights_kept",
            "ratio_vs_torch", "loss_rel_diff", "check", "norm_MB"}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bnkernels")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run on this machine's device (see the module docstring)."""
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(_parse([*ARGS, "--out", str(out)]))
    (folder,) = out.iterdir()
    files = sorted(folder.iterdir())
    result = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    return code, files, result


def _kernel_providers() -> set[str]:
    """The kernel-suite providers the smoke run must have rows for on this device."""
    return {n for n in P.default_providers(DEVICE) if P.PROVIDERS[n].unavailable(DEVICE) is None
            and not (GPU and P.PROVIDERS[n].compiled)}


def _available(names) -> set[str]:
    out = set()
    for n in names:
        prov = P.AUTO if n == P.AUTO.name else P.PROVIDERS.get(n)
        if prov is None or prov.unavailable(DEVICE) is None:  # None: torch's BatchNorm (e2e)
            out.add(n)
    return out


def test_runner_writes_json_markdown_and_plots(smoke):
    code, files, result = smoke
    assert code == 0
    suffixes = sorted(f.name.split(".", 1)[1] if "." in f.name else "" for f in files)
    pngs = ["png"] * 3 if HAVE_MPL else []
    assert suffixes == ["json", "md", *pngs], [f.name for f in files]
    if HAVE_MPL:
        for kind in ("-speedup.png", "-roofline.png", "-host.png"):
            assert any(f.name.endswith(kind) for f in files), kind
    assert all(f.stat().st_size > 0 for f in files)
    md = next(f for f in files if f.suffix == ".md").read_text()
    assert "no performance claims" in md and "### Goals" in md
    assert "#### batch_norm, fwd-train (eager)" in md
    assert "## Targets" in md and "## Host time per call" in md and "## Training step" in md


def test_cpu_section(smoke):
    """The cpu section: on a CPU, step rows of every network and op rows of every site, with
    their ratios and the targets (not judged in a quick run); on a GPU, left out with the
    reason."""
    _, files, result = smoke
    if GPU:
        assert result["cpu"] == {}
        assert any(s.get("section") == "cpu" for s in result["skipped"])
        return
    from bnkernels.benchmarking import cpu_path as C

    steps, ops = result["cpu"]["steps"], result["cpu"]["ops"]
    assert {(r["network"], r["backend"]) for r in steps} == {
        (n, b or "-") for n, b in C.STEP_CONFIGS}
    for r in steps:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        base = next(q for q in steps if q["network"] == "torch" and q["layout"] == r["layout"])
        assert r["ratio_vs_torch"] == pytest.approx(r["median_ms"] / base["median_ms"])
    assert {(r["op"], r["pass"]) for r in ops} == {
        (k, p) for k in C.OP_KINDS for p in ("fwd", "fwd+bwd")}
    assert {tuple(r["shape"])[1:] for r in ops} == {
        (8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4), (64, 2, 2)}
    cpu_targets = [t for t in result["targets"] if t["section"] == "cpu"]
    assert {t["name"] for t in cpu_targets} == {f"cpu {n} step NCHW" for n in C.LIMITS}
    assert all(t["met"] is None and t["value"] > 0 for t in cpu_targets)  # quick: not judged
    md = next(f for f in files if f.suffix == ".md").read_text()
    assert "## The CPU path (cpu)" in md and "## The CPU path, per op (cpu)" in md


def test_schema(smoke):
    _, _, result = smoke
    assert TOP_KEYS <= set(result), TOP_KEYS - set(result)
    assert result["sections"] == ["overhead", "e2e", "cpu", "kernels"]
    if GPU:
        assert result["device"] == torch.cuda.get_device_name(DEVICE)
    else:
        assert result["device"].startswith("cpu")
    assert result["performance_claims"] is False  # a smoke run, on either device
    assert result["copy_bw_gbps"] > 0 and "never graph-captured" in result["copy_bw_method"]
    rows = result["rows"]
    assert rows
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["pass"] in P.PASSES and r["mode"] in suite.MODES
        assert r["dtype"] in S.DTYPES and r["layout"] in ("NCHW", "channels_last", "NC")
        assert r["median_us"] > 0 and r["min_us"] <= r["median_us"] <= r["max_us"]
    assert {r["op"] for r in rows} == set(P.OPS)
    assert {r["pass"] for r in rows} == set(P.PASSES)
    assert {r["mode"] for r in rows} == ({"eager", "graph"} if GPU else {"eager"})
    assert {r["provider"] for r in rows} == _kernel_providers()
    if not GPU:
        assert {"torch-native", "eager", "bnkernels-triton", "bnkernels-reference"} <= {
            r["provider"] for r in rows}
    # Every (provider, mode) times every pass of every op it serves on every input.
    inputs = {(tuple(r["shape"]), r["dtype"], r["layout"]) for r in rows}
    for prov in _kernel_providers():
        for mode in {r["mode"] for r in rows}:
            # the default run's ops (P.OPS): families other tests register are not in it
            for op in (o for o in P.PROVIDERS[prov].ops if o in P.OPS):
                got = {(tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]) for r in rows
                       if r["provider"] == prov and r["mode"] == mode and r["op"] == op}
                passes = [p for p in P.PASSES
                          if not (op == "noisy_batch_norm" and p == "fwd-eval")]
                assert got == {(*i, p) for i in inputs for p in passes}, (prov, mode, op)


def test_unavailable_providers_are_skipped_with_a_reason(smoke):
    _, _, result = smoke
    reasons = {s["provider"]: s["reason"] for s in result["skipped"]
               if "provider" in s and "section" not in s}
    ran = {r["provider"] for r in result["rows"]}
    assert set(P.PROVIDERS) - ran <= set(reasons), set(P.PROVIDERS) - ran - set(reasons)
    assert not ran & set(reasons)
    assert all(reasons.values())
    if GPU:
        assert "smoke" in reasons["torch-compile"] and "smoke" in reasons["eager-compile"]
    else:
        assert "CUDA" in reasons["cudnn"]
        assert "torch.compile" in reasons["torch-compile"]
        assert "bnkernels-cuda" in reasons


def test_row_arithmetic(smoke):
    """gbps = traffic / time, frac_copy_bw = gbps / copy bandwidth, speedups = ratios of the
    same key's times (same mode); null where the baseline did not run."""
    _, _, result = smoke
    rows = result["rows"]
    times = {(*row_key(r), r["provider"]): r["median_us"] for r in rows}
    for r in rows:
        elem = torch.empty((), dtype=S.DTYPES[r["dtype"]]).element_size()
        model, ideal = P.TRAFFIC[r["pass"]]
        assert r["bytes"] == model * math.prod(r["shape"]) * elem
        assert r["bytes_ideal"] == ideal * math.prod(r["shape"]) * elem
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_us"] * 1e3), rel=1e-12)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / result["copy_bw_gbps"], rel=1e-12)
        for field, base in (("speedup_vs_cudnn", "cudnn"),
                            ("speedup_vs_compile", P.COMPILE_BASELINE[r["op"]])):
            t = times.get((*row_key(r), base))
            if t is None:
                assert r[field] is None, field
            else:
                assert r[field] == pytest.approx(t / r["median_us"], rel=1e-12), field
        best = min(t for k, t in times.items() if k[:-1] == row_key(r))
        assert r["speedup_vs_best"] == pytest.approx(best / r["median_us"], rel=1e-12)
        if r["op"] != "batch_norm":
            eager = times[(*row_key(r), "eager")]
            assert r["speedup_vs_eager"] == pytest.approx(eager / r["median_us"], rel=1e-12)
    if not GPU:
        assert all(r["speedup_vs_cudnn"] is None for r in rows)
    # Plain-BN baselines are measured once per mode and reported for every op.
    for r in rows:
        if r["provider"] == "torch-native" and r["op"] != "batch_norm":
            plain = times[("batch_norm", None, *row_key(r)[2:], "torch-native")]
            assert r["median_us"] == plain


def test_forward_outputs_match_the_oracle(smoke):
    _, _, result = smoke
    checked = [r for r in result["rows"] if r["check"] is not None]
    # Every provider that ran has checked forward rows (batch_norm, or l_p for "eager").
    assert {r["provider"] for r in checked} == {r["provider"] for r in result["rows"]}
    assert {r["pass"] for r in checked} == {"fwd-train", "fwd-eval"}
    assert all(r["check"] == "ok" for r in checked), [r for r in checked if r["check"] != "ok"]


def test_goals_are_reported_not_judged_in_a_smoke_run(smoke):
    _, _, result = smoke
    goals = {g["goal"]: g for g in result["summary"]["goals"]}
    assert set(goals) == {"bn_train_vs_cudnn", "bn_train_vs_compile", "bn_min_vs_best",
                          "large_fwd_frac_copy", "large_bwd_frac_copy", "noisy_over_plain",
                          "lp_vs_eager"}
    assert all(g["met"] is None for g in goals.values())
    assert result["summary"]["mode"] == ("graph" if GPU else "eager")
    if not GPU:
        assert goals["bn_train_vs_cudnn"]["value"] is None  # no cuDNN on the CPU


def test_overhead_section(smoke):
    """A row for every provider that could run, op and pass; positive times; ratios are the
    times over F.batch_norm's in the same pass."""
    _, _, result = smoke
    rows = result["overhead"]
    opts = O.OverheadOptions.for_device(DEVICE, smoke=GPU)
    base = O.baseline(DEVICE)
    expected = _available(opts.providers) | {base}
    assert {r["provider"] for r in rows} == expected
    assert P.AUTO.name in expected
    for name in expected:
        ops = {("batch_norm", None)} if O.provider(name).kind != "bnkernels" else {
            ("batch_norm", None), ("noisy_batch_norm", None), ("lp_norm", "2")}
        got = {(r["op"], r["p"], r["pass"]) for r in rows if r["provider"] == name}
        assert got == {(op, p, pass_) for op, p in ops for pass_ in O.PASSES}, name
    base_t = {r["pass"]: r["us_per_call"] for r in rows
              if r["provider"] == base and r["op"] == "batch_norm"}
    for r in rows:
        assert OVERHEAD_KEYS <= set(r), OVERHEAD_KEYS - set(r)
        assert r["shape"] == list(opts.shape) and r["calls"] == opts.calls
        assert 0 < r["min_us_per_call"] <= r["us_per_call"] <= r["max_us_per_call"]
        assert r["baseline"] == base
        assert r["ratio_vs_torch"] == pytest.approx(r["us_per_call"] / base_t[r["pass"]],
                                                    rel=1e-12)
    assert all(r["ratio_vs_torch"] == 1.0 for r in rows
               if r["provider"] == base and r["op"] == "batch_norm")


def test_e2e_section(smoke):
    """Every (model, dtype, layout) trained by torch's BatchNorm and each bnkernels provider
    that could run; positive times; ratios are step times over torch's; and each bnkernels
    model's first loss equals torch's within the dtype's tolerance (same weights after
    convert -- checked exactly -- and the same batch: a grossly wrong kernel fails here)."""
    _, _, result = smoke
    rows = result["e2e"]
    opts = E.E2EOptions.for_device(DEVICE, quick=True, smoke=GPU)
    expected = _available(opts.providers)
    configs = {(m.name, d, lay) for m, d, lay in opts.configs()}
    got = {(r["model"], r["dtype"], r["layout"], r["provider"]) for r in rows}
    assert got == {(*c, p) for c in configs for p in expected}
    torch_t = {(r["model"], r["dtype"], r["layout"]): r for r in rows if r["provider"] == "torch"}
    for r in rows:
        assert E2E_KEYS <= set(r), E2E_KEYS - set(r)
        assert r["steps"] >= opts.min_steps
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        ref = torch_t[(r["model"], r["dtype"], r["layout"])]
        assert r["ratio_vs_torch"] == pytest.approx(r["median_ms"] / ref["median_ms"],
                                                    rel=1e-12)
        if r["provider"] == "torch":
            assert r["check"] is None and r["ratio_vs_torch"] == 1.0
            assert r["weights_kept"] is None
        else:
            assert r["weights_kept"] is True
            diff = abs(r["loss_first"] - ref["loss_first"]) / abs(ref["loss_first"])
            assert r["loss_rel_diff"] == pytest.approx(diff, rel=1e-9, abs=1e-15)
            assert r["check"] == "ok", r
    # Training moves the weights: the loss after the steps differs from the first one.
    assert all(r["loss_last"] != r["loss_first"] for r in rows)


def test_targets_follow_the_rows(smoke):
    _, _, result = smoke
    tg = {t["name"]: t for t in result["targets"]}
    opts = E.E2EOptions.for_device(DEVICE, quick=True, smoke=GPU)
    expected = {"host fwd+bwd per call", "host fwd per call"}
    expected |= {f"{m.name} step {d} {lay}" for m, d, lay in opts.configs()}
    expected |= {f"kernels {g['goal']}" for g in result["summary"]["goals"]}
    if not GPU:  # the cpu section's (see test_cpu_section)
        expected |= {t["name"] for t in result["targets"] if t["section"] == "cpu"}
    assert set(tg) == expected
    assert all(t["met"] is None for t in tg.values())  # smoke run: nothing judged
    for pass_, limit in targets.OVERHEAD_LIMITS.items():
        auto = next(r for r in result["overhead"] if r["provider"] == P.AUTO.name
                    and r["op"] == "batch_norm" and r["pass"] == pass_)
        t = tg[f"host {pass_} per call"]
        assert t["value"] == auto["ratio_vs_torch"] and t["limit"] == limit
    for m, d, lay in opts.configs():
        t = tg[f"{m.name} step {d} {lay}"]
        assert t["limit"] == E.LIMITS[m.arch] and t["compare"] == "<="
        auto = [r for r in result["e2e"] if r["provider"] == P.AUTO.name and
                (r["model"], r["dtype"], r["layout"]) == (m.name, d, lay)]
        assert t["value"] == (auto[0]["ratio_vs_torch"] if auto else None)
    for g in result["summary"]["goals"]:
        t = tg[f"kernels {g['goal']}"]
        assert (t["value"], t["limit"], t["compare"]) == (g["value"], g["target"], g["compare"])


# ----------------------------------------------------------------------------- no run needed


def test_targets_are_judged_on_a_gpu_document():
    """met: True / False against each limit on a full GPU run, None where not measured."""
    def over(prov, pass_, ratio):
        return {"provider": prov, "op": "batch_norm", "p": None, "pass": pass_,
                "shape": [32, 64, 8, 8], "dtype": "fp32", "ratio_vs_torch": ratio}

    def step(prov, model, dtype, layout, ratio):
        return {"provider": prov, "model": model, "dtype": dtype, "layout": layout,
                "ratio_vs_torch": ratio}

    configs = [{"model": "vgg16-cifar-b128", "arch": "vgg16", "dtype": "fp32", "layout": "NCHW"},
               {"model": "vgg16-cifar-b128", "arch": "vgg16", "dtype": "bf16", "layout": "NCHW"},
               {"model": "resnet50-imagenet-b64", "arch": "resnet50", "dtype": "fp32",
                "layout": "NCHW"}]
    doc = {"performance_claims": True, "sections": ["overhead", "e2e", "kernels"],
           "overhead": [over("cudnn", "fwd", 1.0), over("bnkernels-auto", "fwd", 1.6),
                        over("bnkernels-auto", "fwd+bwd", 1.1),
                        over("bnkernels-triton", "fwd+bwd", 0.5)],
           "e2e": [step("bnkernels-auto", "vgg16-cifar-b128", "fp32", "NCHW", 0.94),
                   step("bnkernels-triton", "vgg16-cifar-b128", "bf16", "NCHW", 0.5),
                   step("bnkernels-auto", "vgg16-cifar-b128", "bf16", "NCHW", 0.96),
                   step("bnkernels-auto", "resnet50-imagenet-b64", "fp32", "NCHW", 1.0)],
           "e2e_timing": {"configs": configs},
           "summary": summarize([_row("cudnn", 200.0), _row("bnkernels-triton", 100.0)], True)}
    tg = {t["name"]: t for t in targets.evaluate(doc)}
    assert tg["host fwd+bwd per call"]["value"] == 1.1 and tg["host fwd+bwd per call"]["met"]
    assert tg["host fwd per call"]["value"] == 1.6 and tg["host fwd per call"]["met"] is False
    assert tg["vgg16-cifar-b128 step fp32 NCHW"]["met"] is True  # 0.94 <= 0.95
    assert tg["vgg16-cifar-b128 step bf16 NCHW"]["met"] is False  # auto 0.96, not triton 0.5
    assert tg["resnet50-imagenet-b64 step fp32 NCHW"]["met"] is True  # 1.0 <= 1.0
    assert tg["kernels bn_train_vs_cudnn"]["value"] == 2.0
    assert tg["kernels bn_train_vs_cudnn"]["met"] is True
    assert tg["kernels bn_train_vs_compile"]["value"] is None
    assert tg["kernels bn_train_vs_compile"]["met"] is None
    doc["performance_claims"] = False
    assert all(t["met"] is None for t in targets.evaluate(doc))


def test_e2e_check_fails_on_lost_weights_or_a_different_first_loss():
    def row(provider, ms, loss, kept, dtype="fp32"):
        return {"model": "m", "dtype": dtype, "layout": "NCHW", "provider": provider,
                "median_ms": ms, "loss_first": loss, "weights_kept": kept}

    rows = [row("torch", 10.0, 2.0, None), row("bnkernels-auto", 9.0, 2.0 * (1 + 5e-4), True),
            row("bnkernels-triton", 9.5, 2.0, False), row("bnkernels-cuda", 8.0, 2.01, True),
            row("torch", 4.0, 3.0, None, "bf16"), row("bnkernels-auto", 5.0, 3.09, True, "bf16")]
    E.add_ratios(rows)
    assert [r.get("check") for r in rows] == [None, "ok", "FAIL", "FAIL", None, "ok"]
    assert [r["ratio_vs_torch"] for r in rows] == pytest.approx([1.0, 0.9, 0.95, 0.8, 1.0, 1.25])
    assert rows[3]["loss_rel_diff"] == pytest.approx(0.005)


def test_copy_baseline_is_measured_eagerly_in_every_mode(monkeypatch):
    """The copy baseline is one eager copy_ whatever the kernel timing modes: the run calls
    copy_bandwidth with the same arguments for eager and graph runs, and copy_bandwidth times
    with a Timer that never captures a graph."""
    calls = []

    class Stop(Exception):
        pass

    def fake_copy_bandwidth(*args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(suite, "copy_bandwidth", fake_copy_bandwidth)
    for modes in (("eager",), ("graph",), ("eager", "graph")):
        opts = suite.RunOptions(device=torch.device("cpu"), shapes=(), dtypes=("fp32",),
                                layouts=("NCHW",), modes=modes, log=lambda _: None)
        with pytest.raises(Stop):
            suite.run(opts)
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2]
    monkeypatch.undo()

    seen = []

    def fake_measure(self, build):
        seen.append((self.cuda_graph, self.reps, self.warmup))
        build()()  # the copy itself runs
        return timing.Measurement(1000.0, 900.0, 1100.0, self.reps)

    monkeypatch.setattr(timing.Timer, "measure", fake_measure)
    gbps = timing.copy_bandwidth(torch.device("cpu"), 2**20, flush=False)
    assert seen == [(False, timing.COPY_REPS, timing.COPY_WARMUP)]
    assert gbps == pytest.approx(2 * 2**20 / (1000.0 * 1e3))  # 2 bytes moved per byte, 1 ms


def test_a_run_checkpoints_each_finished_section():
    """After each section the run hands its document so far to the checkpoint (the bench
    command writes it to a partial file): finished sections, goals and targets included."""
    seen = []
    device = torch.device("cpu")
    opts = suite.RunOptions(
        device=device, shapes=(), dtypes=("fp32",), layouts=("NCHW",), sections=("overhead",),
        copy_bytes=2**16, copy_reps=1, copy_warmup=0, flush=False, log=lambda _: None,
        overhead=O.OverheadOptions((2, 3, 4, 4), calls=2, repeats=2, warmup=1,
                                   providers=("torch-native",)),
        checkpoint=lambda doc: seen.append(json.loads(json.dumps(doc))))
    result = suite.run(opts)
    assert [d["sections_done"] for d in seen] == [["overhead"]]
    assert seen[0]["overhead"] == result["overhead"] and result["rows"] == result["e2e"] == []
    assert {r["provider"] for r in result["overhead"]} == {"torch-native"}
    assert [t["name"] for t in seen[0]["targets"]] == ["host fwd+bwd per call",
                                                       "host fwd per call"]
    assert all(t["value"] is None for t in seen[0]["targets"])  # no bnkernels-auto row


def test_host_time_per_call_and_step_times_on_a_fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 0.002

    m = timing.host_time_per_call(call, torch.device("cpu"), calls=5, repeats=3, warmup=2)
    assert m.reps == 3 and m.median_us == pytest.approx(2000.0)
    times = timing.step_times(lambda: clock.__setitem__(0, clock[0] + 0.25),
                              torch.device("cpu"), warmup=1, min_steps=2, min_seconds=1.0)
    assert times == pytest.approx([250.0] * 4)  # 4 steps reach a second
    times = timing.step_times(call, torch.device("cpu"), warmup=0, min_steps=2,
                              min_seconds=1.0, max_steps=3)
    assert len(times) == 3
    with pytest.raises(ValueError):
        timing.host_time_per_call(call, torch.device("cpu"), calls=0, repeats=1)


def test_kernel_inputs_run_the_common_settings_first():
    order = S.combo_order(("fp32", "fp16", "bf16"), ("NCHW", "channels_last"))
    assert order[:2] == [("fp32", "NCHW"), ("bf16", "channels_last")]
    assert sorted(order) == sorted((d, lay) for d in ("fp32", "fp16", "bf16")
                                   for lay in ("NCHW", "channels_last"))
    assert S.combo_order(("fp32",), ("NCHW",)) == [("fp32", "NCHW")]


def test_e2e_networks_are_vgg16_and_resnet50():
    """ResNet-50: torchvision's parameter count and the BatchNorm inputs of shapes.py's
    ResNet-50 (layer names included); VGG-16: a BatchNorm after each of its 13 convs, with
    shapes.py's CIFAR inputs. Run on the meta device (no memory, no time)."""
    with torch.device("meta"):
        resnet = M.build("resnet50", 1000)
        got = M.batch_norm_inputs(resnet, torch.empty(64, 3, 224, 224))
        vgg = M.build("vgg16", 10)
        vgg_got = M.batch_norm_inputs(vgg, torch.empty(128, 3, 32, 32))
    assert sum(p.numel() for p in resnet.parameters()) == 25_557_032
    assert got == S.NETWORKS["resnet50-imagenet-b64"]
    assert [s for _, s in vgg_got] == [s for _, s in S.NETWORKS["vgg16-cifar-b128"]]
    assert {m.name for m in E.GPU_MODELS} <= set(S.NETWORKS)


def _row(provider, t, op="batch_norm", pass_="fwd+bwd", shape=(256, 256, 56, 56), mode=None):
    x_bytes = math.prod(shape) * 2
    row = {"op": op, "p": "2" if op == "lp_norm" else None, "pass": pass_,
           "provider": provider, "shape": list(shape), "shape_name": "x".join(map(str, shape)),
           "dtype": "bf16", "layout": "NCHW", "numel": math.prod(shape), "x_bytes": x_bytes,
           "median_us": t, "bytes": P.TRAFFIC[pass_][0] * x_bytes,
           "frac_copy_bw": P.TRAFFIC[pass_][0] * x_bytes / (t * 1e3) / 3000.0}
    if mode is not None:
        row["mode"] = mode
    return row


def test_speedups_and_goals_on_synthetic_gpu_rows():
    """The GPU-side arithmetic (cuDNN, torch.compile, goals) on made-up times."""
    rows = [_row("cudnn", 200.0), _row("torch-compile", 150.0), _row("bnkernels-triton", 100.0),
            _row("bnkernels-cuda", 125.0), _row("bnkernels-triton", 105.0, "noisy_batch_norm"),
            _row("eager", 400.0, "lp_norm"), _row("bnkernels-triton", 100.0, "lp_norm"),
            _row("bnkernels-triton", 300.0, pass_="fwd-train"),
            _row("cudnn", 270.0, pass_="fwd-train")]
    add_speedups(rows)
    tri = rows[2]
    assert tri["speedup_vs_cudnn"] == 2.0 and tri["speedup_vs_compile"] == 1.5
    assert rows[3]["speedup_vs_best"] == 0.8 and rows[0]["speedup_vs_cudnn"] == 1.0
    assert rows[6]["speedup_vs_eager"] == 4.0
    goals = {g["goal"]: g for g in summarize(rows, claims=True)["goals"]}
    assert goals["bn_train_vs_cudnn"]["value"] == 2.0 and goals["bn_train_vs_cudnn"]["met"]
    assert goals["bn_train_vs_cudnn"]["by_provider"] == {"bnkernels-triton": 2.0,
                                                         "bnkernels-cuda": 1.6}
    assert goals["bn_train_vs_compile"]["value"] == 1.5
    assert goals["bn_min_vs_best"]["value"] == pytest.approx(0.9)  # fwd-train: 270 / 300
    assert goals["bn_min_vs_best"]["met"] is False
    assert goals["noisy_over_plain"]["value"] == pytest.approx(1.05)
    assert goals["noisy_over_plain"]["compare"] == "<="
    assert goals["lp_vs_eager"]["value"] == 4.0 and goals["lp_vs_eager"]["met"]
    frac = goals["large_fwd_frac_copy"]
    assert frac["n"] == 1 and frac["value"] == pytest.approx(rows[7]["frac_copy_bw"])


def test_modes_compare_apart_and_goals_use_graph_rows():
    """Eager and graph rows of one input never compare with each other; the goals are judged
    on the graph rows (kernel time) when there are any."""
    rows = [_row("cudnn", 200.0, mode="eager"), _row("bnkernels-triton", 250.0, mode="eager"),
            _row("cudnn", 180.0, mode="graph"), _row("bnkernels-triton", 90.0, mode="graph")]
    add_speedups(rows)
    assert rows[1]["speedup_vs_cudnn"] == pytest.approx(0.8)
    assert rows[3]["speedup_vs_cudnn"] == pytest.approx(2.0)
    s = summarize(rows, claims=True)
    assert s["mode"] == "graph"
    goals = {g["goal"]: g for g in s["goals"]}
    assert goals["bn_train_vs_cudnn"]["value"] == pytest.approx(2.0)
    assert summarize(rows[:2], claims=True)["mode"] == "eager"


def test_network_shapes_follow_the_models():
    assert len(S.NETWORKS["vgg16-cifar-b128"]) == 13  # a BatchNorm after each of 13 convs
    assert len(S.NETWORKS["resnet50-imagenet-b64"]) == 53  # stem + 16 blocks x 3 + 4 shortcuts
    assert S.NETWORKS["resnet50-imagenet-b256"][0] == ("bn1", (256, 64, 112, 112))
    assert S.NETWORKS["resnet50-imagenet-b64"][-1] == ("layer4.2.bn3", (64, 2048, 7, 7))
    assert S.NETWORKS["vgg16-imagenet-b64"][-1] == ("bn13", (64, 512, 14, 14))
    full = S.suites()["full"]
    assert {(16, 2, 512, 512), (8, 2048, 7, 7), (1, 64, 112, 112), (65536, 1024)} <= {
        s.dims for s in full.shapes}
    assert set(full.dtypes) == {"fp32", "fp16", "bf16"}
    assert set(S.suites()["quick"].shapes) <= set(full.shapes)
    assert [s.dims for s in S.resolve_shapes(["edge", "8x4x5x5"])][-1] == (8, 4, 5, 5)


def test_cli_has_the_bench_subcommand():
    from bnkernels.cli import build_parser

    args = build_parser().parse_args(["bench", "--device", "cpu", "--quick", "--out", "x"])
    assert args.func is bench.main and args.quick and args.out == "x"


def test_quick_gpu_options_cover_every_target():
    """--quick on a GPU: kernels as CUDA-graph replays, overhead and e2e at full size, a time
    limit; the full run times both modes. (Options only: nothing runs.)"""
    if not GPU:
        pytest.skip("the GPU defaults need a CUDA device to build their options")
    quick = bench.options(_parse(["--device", "cuda", "--quick"]))
    assert quick.modes == ("graph",) and quick.time_limit_s == bench.QUICK_TIME_LIMIT
    assert quick.sections == suite.SECTIONS and quick.claims
    assert quick.e2e.models == E.GPU_MODELS and quick.overhead.shape == O.GPU_SHAPE
    full = bench.options(_parse(["--device", "cuda"]))
    assert full.modes == ("eager", "graph") and full.time_limit_s is None
    assert bench.options(_parse(["--device", "cuda", "--cuda-graph"])).modes == ("graph",)


def test_e2e_norm_bytes_of_resnet50_sites():
    """The e2e rows' norm_MB: ResNet-50's 53 BatchNorms are 33 BN -> ReLU sites, 16 BN -> add
    -> ReLU sites and 4 downsampling BatchNorms; fusing saves 5 element accesses at each fused
    site's elements (13 -> 8 and 16 -> 11 per element)."""
    from bnkernels.benchmarking import models

    spec = E.TINY_MODELS[1]
    torch.manual_seed(0)
    model = models.build(spec.arch, spec.classes, spec.width)
    x = torch.randn(spec.batch, 3, spec.image, spec.image)
    sites = E.norm_sites(model, x)
    kinds = [k for k, _ in sites]
    assert (kinds.count("bn+relu"), kinds.count("bn+add+relu"), kinds.count("bn")) == (33, 16, 4)
    fused_elems = sum(n for k, n in sites if k != "bn")
    assert E.norm_bytes(sites, 2, False) - E.norm_bytes(sites, 2, True) == 5 * 2 * fused_elems
    assert E.norm_bytes(sites, 4, False) == 2 * E.norm_bytes(sites, 2, False)


def test_report_renders_the_stack_rows_emulated_fields():
    """The stack table shows what stack.measure writes beside the stubbed times (emulated
    launches: time, ratio and its verdict; launches per call; one launch's median and spread),
    and '-' in those columns for rows written before those fields existed."""
    from bnkernels.benchmarking import report

    new = {"api": "functional", "op": "lp_norm", "pass": "fwd", "us_per_call": 9.7,
           "torch_us_per_call": 8.1, "ratio_vs_torch": 1.2, "limit": 1.2, "met": True,
           "us_per_call_emulated": 31.25, "ratio_emulated": 3.86, "met_emulated": False,
           "launches": 2, "us_per_launch": 10.5, "us_per_launch_spread": [9.75, 12.0]}
    old = {k: new[k] for k in ("api", "op", "pass", "us_per_call", "torch_us_per_call",
                               "ratio_vs_torch", "limit", "met")}
    md = "\n".join(report._stack_md({"stack": [new, old], "stack_timing": {}}))
    head = next(line for line in md.splitlines() if line.startswith("| api"))
    assert [c.strip() for c in head.strip("|").split("|")][-4:] == [
        "emulated us/call", "emulated ratio", "launches", "us/launch"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| functional")]
    assert rows[0][-4:] == ["31.2", "3.86 NOT MET", "2", "10.50 [9.75, 12.00]"]
    assert rows[1][-4:] == ["-", "-", "-", "-"]
    assert rows[0][:7] == rows[1][:7]
