"""The benchmark runner on the CPU (``bnkernels bench --device cpu --quick``): result schema,
files, and the arithmetic of every row. No performance is judged here; the GPU run is where
the goals are measured."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bnkernels import bench
from bnkernels.benchmarking import providers as P
from bnkernels.benchmarking import shapes as S
from bnkernels.benchmarking.suite import add_speedups, row_key, summarize

ROW_KEYS = {"op", "pass", "provider", "shape", "dtype", "layout", "median_us", "gbps",
            "frac_copy_bw", "speedup_vs_cudnn", "speedup_vs_compile"}
TOP_KEYS = {"device", "torch", "triton", "cudnn", "copy_bw_gbps", "rows"}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bnkernels")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One quick CPU run (the reference and interpreted Triton providers, tiny shapes)."""
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(_parse(["--device", "cpu", "--quick", "--out", str(out)]))
    files = sorted((out / "cpu").iterdir())
    result = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    return code, files, result


def test_runner_writes_json_markdown_and_plots(smoke):
    code, files, result = smoke
    assert code == 0
    suffixes = sorted(f.name.split(".", 1)[1] if "." in f.name else "" for f in files)
    assert suffixes == ["json", "md", "png", "png"], [f.name for f in files]
    assert any(f.name.endswith("-speedup.png") for f in files)
    assert any(f.name.endswith("-roofline.png") for f in files)
    assert all(f.stat().st_size > 0 for f in files)
    md = next(f for f in files if f.suffix == ".md").read_text()
    assert "no performance claims" in md and "## Goals" in md and "### batch_norm, fwd-train" in md


def test_schema(smoke):
    _, _, result = smoke
    assert TOP_KEYS <= set(result)
    assert result["device"].startswith("cpu") and result["performance_claims"] is False
    assert result["copy_bw_gbps"] > 0
    rows = result["rows"]
    assert rows
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["pass"] in ("fwd-train", "fwd-eval", "bwd", "fwd+bwd")
        assert r["dtype"] in S.DTYPES and r["layout"] in ("NCHW", "channels_last", "NC")
    assert {r["op"] for r in rows} == set(P.OPS)
    assert {r["pass"] for r in rows} == set(P.PASSES)
    assert {"torch-native", "eager", "bnkernels-triton", "bnkernels-reference"} <= {
        r["provider"] for r in rows}


def test_unavailable_providers_are_skipped_with_a_reason(smoke):
    _, _, result = smoke
    reasons = {s["provider"]: s["reason"] for s in result["skipped"] if "provider" in s}
    assert "CUDA" in reasons["cudnn"]
    assert "torch.compile" in reasons["torch-compile"]
    assert "bnkernels-cuda" in reasons
    assert not any(r["provider"] in reasons for r in result["rows"])


def test_row_arithmetic(smoke):
    """gbps = traffic / time, frac_copy_bw = gbps / copy bandwidth, speedups = ratios of the
    same key's times; without cuDNN and torch.compile, those columns are null."""
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
        assert r["speedup_vs_cudnn"] is None and r["speedup_vs_compile"] is None
        best = min(t for k, t in times.items() if k[:-1] == row_key(r))
        assert r["speedup_vs_best"] == pytest.approx(best / r["median_us"], rel=1e-12)
        if r["op"] != "batch_norm":
            eager = times[(*row_key(r), "eager")]
            assert r["speedup_vs_eager"] == pytest.approx(eager / r["median_us"], rel=1e-12)
    # Plain-BN baselines are measured once and reported for every op.
    for r in rows:
        if r["provider"] == "torch-native" and r["op"] != "batch_norm":
            plain = times[("batch_norm", None, *row_key(r)[2:], "torch-native")]
            assert r["median_us"] == plain


def test_forward_outputs_match_the_oracle(smoke):
    _, _, result = smoke
    checked = [r for r in result["rows"] if r["check"] is not None]
    assert {r["provider"] for r in checked} >= {"torch-native", "eager", "bnkernels-triton"}
    assert all(r["check"] == "ok" for r in checked), [r for r in checked if r["check"] != "ok"]


def test_goals_are_reported_not_judged_on_cpu(smoke):
    _, _, result = smoke
    goals = {g["goal"]: g for g in result["summary"]["goals"]}
    assert set(goals) == {"bn_train_vs_cudnn", "bn_train_vs_compile", "bn_min_vs_best",
                          "large_fwd_frac_copy", "large_bwd_frac_copy", "noisy_over_plain",
                          "lp_vs_eager"}
    assert all(g["met"] is None for g in goals.values())
    assert goals["bn_train_vs_cudnn"]["value"] is None  # no cuDNN on the CPU


def _row(provider, t, op="batch_norm", pass_="fwd+bwd", shape=(256, 256, 56, 56)):
    x_bytes = math.prod(shape) * 2
    return {"op": op, "p": "2" if op == "lp_norm" else None, "pass": pass_,
            "provider": provider, "shape": list(shape), "shape_name": "x".join(map(str, shape)),
            "dtype": "bf16", "layout": "NCHW", "numel": math.prod(shape), "x_bytes": x_bytes,
            "median_us": t, "bytes": P.TRAFFIC[pass_][0] * x_bytes,
            "frac_copy_bw": P.TRAFFIC[pass_][0] * x_bytes / (t * 1e3) / 3000.0}


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
    assert goals["lp_vs_eager"]["value"] == 4.0 and goals["lp_vs_eager"]["met"]
    frac = goals["large_fwd_frac_copy"]
    assert frac["n"] == 1 and frac["value"] == pytest.approx(rows[7]["frac_copy_bw"])


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
    from bnkernels.experiments.cli import build_parser

    args = build_parser().parse_args(["bench", "--device", "cpu", "--quick", "--out", "x"])
    assert args.func is bench.main and args.quick and args.out == "x"
