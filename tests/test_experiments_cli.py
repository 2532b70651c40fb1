"""Training runs and the command line: run folders, resume after a kill with the same
metrics as an uninterrupted run (RNG states from any device), the CLI on tiny configs, the
reproduce report over seeds (the gpu mode scaled down to seconds on the CPU), and DDP with
SyncBatchNorm on two gloo processes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnkernels
from bnkernels.cli import main
from bnkernels.experiments import report
from bnkernels.experiments.train import (
    CONFIGS,
    RunConfig,
    read_metrics,
    restore_rng_state,
    rng_state,
    train,
)

needs_modules = pytest.mark.skipif(not hasattr(bnkernels, "LpNorm2d"),
                                   reason="modules issue pending")
TINY = CONFIGS["tiny"]


@pytest.fixture(autouse=True)
def _reference_backend(_restore_backend):
    """The reference backend on one thread, as the reproduce runs use (small ops; several
    OpenMP threads on a busy machine stall)."""
    bnkernels.set_backend("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    """A child process's environment: the reference backend, not the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(BNKERNELS_BACKEND="reference", OMP_NUM_THREADS="1")
    return env


def test_run_folder_layout(tmp_path):
    run = train(TINY, tmp_path / "run", progress=False)
    assert json.loads((run / "config.json").read_text()) == TINY.to_dict()
    assert RunConfig.from_dict(json.loads((run / "config.json").read_text())) == TINY
    v = json.loads((run / "versions.json").read_text())
    assert v["torch"] and v["bnkernels"] == bnkernels.__version__
    done = json.loads((run / "done.json").read_text())
    assert done["steps"] == TINY.steps and done["seconds"] > 0 and done["cpu_seconds"] > 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_4.pt", "step_6.pt"]  # every 2 steps, the last 2 kept
    recs = read_metrics(run)
    kinds = {r["kind"] for r in recs}
    assert kinds == {"train", "test", "ics", "landscape", "hessian", "act", "act_in"}
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(TINY.steps))
    assert [r["step"] for r in recs if r["kind"] == "test"] == [3, 6]
    assert [(r["step"], r["layer"]) for r in recs if r["kind"] == "ics"] == [
        (0, 2), (0, 3), (3, 2), (3, 3)]
    assert sorted({r["step"] for r in recs if r["kind"] == "act"}) == [0, 1, 3, 4]
    hess = [r for r in recs if r["kind"] == "hessian"]
    assert [r["step"] for r in hess] == [0, 3]
    assert all(r["iterations"] >= 1 and r["max_eigenvalue"] >= r["min_eigenvalue"]
               for r in hess)
    assert all(0 <= r["acc"] <= 1 for r in recs if r["kind"] == "train")
    # a finished run is left alone; another config in the same folder is refused
    train(TINY, run, progress=False)
    assert read_metrics(run) == recs
    with pytest.raises(FileExistsError, match="another config"):
        train(dataclasses.replace(TINY, lr=0.2), run, progress=False)


@pytest.mark.parametrize("norm", ["batchnorm", pytest.param("noisy", marks=needs_modules)])
def test_resume_after_a_kill_gives_the_same_metrics(tmp_path, norm):
    cfg = dataclasses.replace(TINY, norm=norm, steps=7, checkpoint_every=3, hessian_every=0)
    full = train(cfg, tmp_path / "full", progress=False)
    killed = tmp_path / "killed"
    train(cfg, killed, stop_after=5, progress=False)  # checkpoint at 3, metrics through 4
    partial = read_metrics(killed)
    assert max(r["step"] for r in partial) == 4 and not (killed / "done.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, killed, progress=False)
    train(cfg, killed, resume=True, progress=False)
    assert (killed / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    # killed before any checkpoint: starts over, still no duplicates
    early = tmp_path / "early"
    train(cfg, early, stop_after=2, progress=False)
    train(cfg, early, resume=True, progress=False)
    assert (early / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_rng_state_restores_whatever_device_or_dtype_the_checkpoint_loads_with(monkeypatch):
    """A checkpoint's RNG states go back as CPU torch.ByteTensors even when torch.load's
    map_location moved them (to a GPU, or here: another dtype, non-contiguous); the CUDA
    states of a GPU-trained run reach torch.cuda.set_rng_state converted the same way."""
    state = rng_state()
    expected = torch.rand(5)
    odd = state["torch_rng"].to(torch.int64).repeat_interleave(2)[::2]  # int64, strided
    assert not odd.is_contiguous()
    restore_rng_state({"torch_rng": odd})
    assert torch.equal(torch.rand(5), expected)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device: calls.append((t, device)))
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restore_rng_state({"torch_rng": state["torch_rng"].double(),
                       "cuda_rng": [cuda_state.to(torch.float32), cuda_state]})  # 2 GPUs saved
    assert torch.equal(torch.rand(5), expected)
    assert len(calls) == 1 and calls[0][1] == 0  # only the devices present here
    assert calls[0][0].dtype == torch.uint8 and calls[0][0].device.type == "cpu"
    assert torch.equal(calls[0][0], cuda_state)


def test_cli_train_and_resume(tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["train", "--config", "tiny", "--run-dir", str(run), "--no-progress",
            "--steps", "4", "--norm", "none", "--ics-layers", "1,2"]
    assert main(args + ["--stop-after", "3"]) == 0
    assert main(args + ["--resume"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["steps"] == 4 and cfg["norm"] == "none" and cfg["ics_layers"] == [1, 2]
    assert [r["step"] for r in read_metrics(run, "train")] == [0, 1, 2, 3]
    assert "test acc" in capsys.readouterr().out


def test_cli_reports_missing_cifar_and_occupied_run_folders(tmp_path, capsys):
    assert main(["train", "--config", "tiny", "--dataset", "cifar10", "--data-dir",
                 str(tmp_path), "--run-dir", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and "--download" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # no half-made run folder to trip over later
    run = str(tmp_path / "b")
    assert main(["train", "--config", "tiny", "--run-dir", run, "--no-progress",
                 "--stop-after", "1"]) == 0
    assert main(["train", "--config", "tiny", "--run-dir", run, "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_dln_train(tmp_path):
    run = tmp_path / "dln"
    assert main(["train", "--config", "dln-tiny", "--run-dir", str(run), "--no-progress",
                 "--norm", "batchnorm", "--steps", "3"]) == 0
    losses = [r["loss"] for r in read_metrics(run, "train")]
    assert len(losses) == 3 and losses[-1] < losses[0]  # summed squared error decreases
    assert 1e4 < losses[0] < 1e6  # summed over 1000 samples


def test_cli_sweep(tmp_path, capsys):
    out = tmp_path / "ics"
    assert main(["ics", "--quick", "--out", str(out), "--norms", "none,batchnorm", "--jobs", "1",
                 "--no-progress", "--steps", "2", "--arch", "vgg11", "--width", "0.03125",
                 "--batch-size", "16", "--ics-every", "1", "--ics-layers", "2,5"]) == 0
    assert (out / "ics.png").is_file()
    name = f"batchnorm-lr{CONFIGS['vgg-quick'].lr:g}"  # the quick config's lr
    assert len(read_metrics(out / name, "ics")) == 4
    assert name in capsys.readouterr().out


GPU_SCALED = ["--mode", "gpu", "--device", "cpu", "--seeds", "0,1", "--steps", "1",
              "--dln-steps", "2", "--set", "width=0.03125", "--set", "batch_size=16",
              "--set", "hessian_iters=2", "--set", "hessian_trace_samples=1",
              "--dln-set", "hessian_iters=2", "--dln-set", "hessian_trace_samples=1",
              "--jobs", "1", "--no-progress"]
"""The gpu mode's code path (VGG-16 at full width for 3,000 steps on a GPU) at a scale the
CPU runs in seconds: 1/32 width, batch 16, 1 step (the DLN 2; schedules scaled along), two
seeds."""


@pytest.fixture(scope="module")
def gpu_suite(tmp_path_factory):
    """`bnkernels reproduce --mode gpu`, scaled down, once for the module: (folder, report
    text, stdout)."""
    import contextlib
    import io

    bnkernels.set_backend("reference")
    out = tmp_path_factory.mktemp("suite") / "suite"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["reproduce", "--out", str(out), *GPU_SCALED]) == 0
    bnkernels.set_backend("auto")
    return out, (out / "report.md").read_text(), buf.getvalue()


def test_gpu_mode_scaled_down_writes_the_report_over_seeds(gpu_suite):
    out, text, stdout = gpu_suite
    meta = json.loads((out / "suite.json").read_text())
    assert meta["mode"] == "gpu" and meta["suite"]["seeds"] == [0, 1]
    cfg = RunConfig.from_dict(meta["runs"]["vgg-batchnorm-lr0.1-seed1"]["config"])
    assert (cfg.arch, cfg.width, cfg.batch_size, cfg.lr, cfg.steps, cfg.seed) == (
        "vgg16", 1 / 32, 16, 0.1, 1, 1)
    assert cfg.momentum == 0 and cfg.weight_decay == 0 and cfg.hessian_every == 1
    assert len(meta["runs"]) == 2 * 15
    assert all((out / name / "done.json").is_file() for name in meta["runs"])
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == len(report.CLAIMS)
    assert "|" + " measured here (median [min, max] over seeds) |" in text
    for c in claims:
        assert c["held"] in {"held", "not held", "mixed", "not measured"}
        assert c["seeds"] == 2 and [p["seed"] for p in c["per_seed"]] == [0, 1]
        assert c["held_in"] == sum(p["held"] == "held" for p in c["per_seed"])
        assert c["measured"].replace("|", "\\|") in text
        assert f"[{c['held']}" in stdout and c["claim"] in stdout
    hess = claims[-1]
    assert "top Hessian eigenvalue" in hess["claim"] and hess["measured_in"] == 2
    assert set(hess["per_seed"][0]["values"]) >= {"vgg_std", "vgg_bn", "dln_std", "dln_bn"}
    rec = read_metrics(out / "vgg-l2-lr0.1-seed0", "hessian")[0]
    assert {"top_eigenvalue", "iterations", "trace", "trace_stderr"} <= set(rec)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"fig1.png", "fig3.png", "fig4.png", "fig9.png", "fig13.png",
            "curvature.png"} <= set(pngs)
    for p in pngs:
        assert f"]({p})" in text
    assert "report.md" in stdout and "**Gpu mode**" in text
    assert "| vgg-batchnorm-lr0.1 | 0,1 | 1 |" in text
    assert "## Noisy BatchNorm's test accuracy" in text


def test_report_is_drawn_from_saved_files_only(gpu_suite, tmp_path):
    """Redrawn from a copy of the folder (nothing in memory), the report says the same; and
    the verdicts follow the numbers of every seed: editing the saved test accuracies flips a
    claim, and seeds that disagree make it mixed."""
    import shutil

    src, text, _ = gpu_suite
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "report.md").unlink()
    (out / "claims.json").unlink()
    # (the fixture drew the figures from the saved files already: write_report loads them)
    assert main(["reproduce", "--mode", "gpu", "--out", str(out), "--report-only",
                 "--no-figures"]) == 0
    again = (out / "report.md").read_text()
    assert again.split("## Claims")[1] == text.split("## Claims")[1]

    claim = 2  # "BatchNorm improves test accuracy (at the base lr)"

    def set_test_acc(norm, seed, acc):
        path = out / f"vgg-{norm}-lr0.1-seed{seed}" / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        for r in lines:
            if r["kind"] == "test":
                r["acc"] = acc
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def verdict():
        report.write_report(out, figures=False)
        rows = {r["id"]: r for r in json.loads((out / "claims.json").read_text())}
        return rows[claim]

    for seed in (0, 1):
        set_test_acc("none", seed, 0.9)
        set_test_acc("batchnorm", seed, 0.5 + 0.1 * seed)
    row = verdict()
    assert row["held"] == "not held" and row["held_in"] == 0
    assert "BN 55.0% [50.0%, 60.0%]" in row["measured"]
    set_test_acc("batchnorm", 1, 0.95)
    row = verdict()
    assert row["held"] == "mixed" and row["held_in"] == 1
    set_test_acc("batchnorm", 0, 0.905)  # within the 1% margin: a tie does not count
    assert verdict()["held"] == "mixed"
    set_test_acc("batchnorm", 0, 0.95)
    assert verdict()["held"] == "held"


def test_reproduce_resumes_after_a_kill(gpu_suite, tmp_path):
    """A suite killed with one run unfinished (its last checkpoint and done.json gone, as
    when killed mid-run) resumes on the next call: that run continues from its checkpoint and
    ends with the metrics of the uninterrupted run; finished runs are not retrained."""
    import shutil

    src, _, _ = gpu_suite
    out = tmp_path / "killed"
    shutil.copytree(src, out)
    run = out / "dln-batchnorm-lr1e-06-seed1"
    full = (run / "metrics.jsonl").read_bytes()
    (run / "done.json").unlink()
    (run / "checkpoints" / "step_2.pt").unlink()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 99, "half-written')
    other = out / "vgg-none-lr0.1-seed0" / "metrics.jsonl"
    stamp = other.stat().st_mtime_ns
    assert main(["reproduce", "--out", str(out), "--no-figures", *GPU_SCALED]) == 0
    assert (run / "metrics.jsonl").read_bytes() == full
    assert (run / "done.json").is_file() and other.stat().st_mtime_ns == stamp


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnkernels", "--help"], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "ics", "landscape", "lr-sweep", "lp", "reproduce", "demo"):
        assert cmd in out.stdout


def test_cli_train_refuses_nccl_without_a_gpu_per_process(tmp_path, capsys, monkeypatch):
    """Under torchrun with more processes than GPUs, asking for NCCL fails with a message that
    says why (checked here without starting processes: WORLD_SIZE 2 on a machine whose
    visible GPUs are fewer)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: min(1, torch.cuda.device_count()))
    assert main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "r"), "--no-progress",
                 "--dist-backend", "nccl"]) == 2
    err = capsys.readouterr().err
    assert "NCCL needs one GPU per process" in err and "--dist-backend gloo" in err


@pytest.mark.skipif(not hasattr(bnkernels, "convert"), reason="modules issue pending")
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes: SyncBatchNorm over the two halves of each batch and
    DDP's averaged gradients reproduce the single-process run."""
    cfg = dataclasses.replace(TINY, steps=4, ics_every=0, landscape_every=0, hessian_every=0,
                              act_every=0, test_every=2)
    single = train(cfg, tmp_path / "single", progress=False, device="cpu")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in
            (("steps", 4), ("ics_every", 0), ("landscape_every", 0), ("hessian_every", 0),
             ("act_every", 0), ("test_every", 2))]
    # gloo on the CPU: works whatever GPUs the machine has (two ranks on one GPU cannot use
    # NCCL; see test_choose_dist_backend)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "bnkernels", "train", "--config", "tiny", "--run-dir",
           str(tmp_path / "ddp"), "--no-progress", "--device", "cpu", "--dist-backend", "gloo",
           *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one, two = read_metrics(single), read_metrics(tmp_path / "ddp")
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-9)
    ckpt = Path(tmp_path / "ddp" / "checkpoints")
    assert (ckpt / "step_4.pt").is_file()


@pytest.mark.skipif(not hasattr(bnkernels, "convert"), reason="modules issue pending")
def test_ddp_two_gloo_processes_with_every_probe_on(tmp_path):
    """torchrun with 2 CPU processes and every measurement on (ICS, landscape along both
    directions, the Hessian, activations): the run finishes and rank 0 writes every kind of
    record; the Hessian is that of rank 0's slice (its SyncBatchNorm as local BatchNorm)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "bnkernels", "train", "--config", "tiny", "--run-dir",
           str(tmp_path / "ddp"), "--no-progress", "--device", "cpu", "--dist-backend", "gloo",
           "--steps=4", "--landscape-directions=gradient,random"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = read_metrics(tmp_path / "ddp")
    assert {r["kind"] for r in recs} == {"train", "test", "ics", "landscape", "hessian", "act",
                                        "act_in"}
    hess = [r for r in recs if r["kind"] == "hessian"]
    assert [r["step"] for r in hess] == [0, 3]
    assert all(math.isfinite(r["top_eigenvalue"]) for r in hess)


def test_jobs_1_and_jobs_2_give_identical_metrics(tmp_path, monkeypatch):
    """Every run trains in a worker process with the portable floating-point environment,
    whatever --jobs is: two small runs (VGG and the DLN) under jobs=1 and jobs=2 write the
    same metrics.jsonl, byte for byte, from a parent process that has none of it set."""
    from bnkernels.experiments.batch import PORTABLE_CPU_ENV, run_many

    for k in PORTABLE_CPU_ENV:
        monkeypatch.delenv(k, raising=False)
    cfgs = [dataclasses.replace(TINY, steps=3, hessian_every=0, landscape_every=0),
            dataclasses.replace(CONFIGS["dln-tiny"], steps=3, hessian_every=0)]
    for jobs in (1, 2):
        run_many([(c, tmp_path / f"j{jobs}" / c.model) for c in cfgs], jobs=jobs, device="cpu",
                 progress=False)
    for c in cfgs:
        a = (tmp_path / "j1" / c.model / "metrics.jsonl").read_bytes()
        assert a and a == (tmp_path / "j2" / c.model / "metrics.jsonl").read_bytes()
