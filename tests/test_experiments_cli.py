"""Training runs and the command line: run folders, resume after a kill with the same
metrics as an uninterrupted run, the CLI on tiny configs, the reproduce report, and DDP with
SyncBatchNorm on two gloo processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bnkernels
from bnkernels.experiments import report
from bnkernels.experiments.cli import main
from bnkernels.experiments.train import CONFIGS, RunConfig, read_metrics, train

needs_modules = pytest.mark.skipif(not hasattr(bnkernels, "LpNorm2d"),
                                   reason="modules issue pending")
TINY = CONFIGS["tiny"]


@pytest.fixture(autouse=True)
def _reference_backend(_restore_backend):
    bnkernels.set_backend("reference")


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
    assert (run / "done.json").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_4.pt", "step_6.pt"]  # every 2 steps, the last 2 kept
    recs = read_metrics(run)
    kinds = {r["kind"] for r in recs}
    assert kinds == {"train", "test", "ics", "landscape", "act"}
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(TINY.steps))
    assert [r["step"] for r in recs if r["kind"] == "test"] == [3, 6]
    assert [(r["step"], r["layer"]) for r in recs if r["kind"] == "ics"] == [
        (0, 2), (0, 3), (3, 2), (3, 3)]
    assert sorted({r["step"] for r in recs if r["kind"] == "act"}) == [0, 1, 3, 4]
    assert all(0 <= r["acc"] <= 1 for r in recs if r["kind"] == "train")
    # a finished run is left alone; another config in the same folder is refused
    train(TINY, run, progress=False)
    assert read_metrics(run) == recs
    with pytest.raises(FileExistsError, match="another config"):
        train(dataclasses.replace(TINY, lr=0.2), run, progress=False)


@pytest.mark.parametrize("norm", ["batchnorm", pytest.param("noisy", marks=needs_modules)])
def test_resume_after_a_kill_gives_the_same_metrics(tmp_path, norm):
    cfg = dataclasses.replace(TINY, norm=norm, steps=7, checkpoint_every=3)
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
    assert len(read_metrics(out / "batchnorm-lr0.1", "ics")) == 4
    assert "batchnorm-lr0.1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """`bnkernels reproduce --mode tiny` once for the module: (folder, report text, stdout)."""
    import contextlib
    import io

    bnkernels.set_backend("reference")
    out = tmp_path_factory.mktemp("suite") / "suite"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["reproduce", "--mode", "tiny", "--out", str(out), "--jobs", "1",
                     "--no-progress"]) == 0
    bnkernels.set_backend("auto")
    return out, (out / "report.md").read_text(), buf.getvalue()


def test_cli_reproduce_tiny_writes_the_report(tiny_suite):
    out, text, stdout = tiny_suite
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == len(report.CLAIMS)
    assert {c["held"] for c in claims} <= {"held", "not held", "not measured"}
    assert "| # | claim | paper (figure: number) | measured here | criterion | result |" in text
    for c in claims:
        assert c["measured"].replace("|", "\\|") in text
        assert f"[{c['held']}] {c['claim']}" in stdout
    pngs = sorted(p.name for p in out.glob("fig*.png"))
    assert {"fig1.png", "fig3.png", "fig4.png", "fig9.png", "fig13.png"} <= set(pngs)
    for p in pngs:
        assert f"]({p})" in text
    assert "report.md" in stdout
    assert "| vgg-batchnorm-lr0.1 | 6 |" in text


def test_report_is_drawn_from_saved_files_only(tiny_suite, tmp_path):
    """Redrawn from a copy of the folder (nothing in memory), the report says the same; and
    the verdicts follow the numbers: editing the saved test accuracies flips a claim."""
    import shutil

    src, text, _ = tiny_suite
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    for p in out.glob("fig*.png"):
        p.unlink()
    (out / "report.md").unlink()
    assert main(["reproduce", "--mode", "tiny", "--out", str(out), "--report-only"]) == 0
    again = (out / "report.md").read_text()
    assert again.split("## Claims")[1] == text.split("## Claims")[1]
    assert (out / "fig1.png").is_file()

    claim = "BatchNorm improves test accuracy (lr 0.1)"
    std, bn = (out / f"vgg-{n}-lr0.1" / "metrics.jsonl" for n in ("none", "batchnorm"))

    def set_test_acc(path, acc):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        for r in lines:
            if r["kind"] == "test":
                r["acc"] = acc
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def verdict():
        report.write_report(out, figures=False)
        rows = {r["claim"]: r for r in json.loads((out / "claims.json").read_text())}
        return rows[claim]

    set_test_acc(std, 0.9)
    set_test_acc(bn, 0.5)
    row = verdict()
    assert row["held"] == "not held" and "BN 50.0%" in row["measured"]
    set_test_acc(bn, 0.95)
    assert verdict()["held"] == "held"


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnkernels", "--help"], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "ics", "landscape", "lr-sweep", "lp", "reproduce", "demo"):
        assert cmd in out.stdout


@pytest.mark.skipif(not hasattr(bnkernels, "convert"), reason="modules issue pending")
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes: SyncBatchNorm over the two halves of each batch and
    DDP's averaged gradients reproduce the single-process run."""
    cfg = dataclasses.replace(TINY, steps=4, ics_every=0, landscape_every=0, act_every=0,
                              test_every=2)
    single = train(cfg, tmp_path / "single", progress=False)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in
            (("steps", 4), ("ics_every", 0), ("landscape_every", 0), ("act_every", 0),
             ("test_every", 2))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "bnkernels", "train", "--config", "tiny", "--run-dir",
           str(tmp_path / "ddp"), "--no-progress", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one, two = read_metrics(single), read_metrics(tmp_path / "ddp")
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-9)
    ckpt = Path(tmp_path / "ddp" / "checkpoints")
    assert (ckpt / "step_4.pt").is_file()
