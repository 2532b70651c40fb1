"""The command line as a new user meets it on a CPU-only machine: `bnkernels demo` from a fresh
process, checkpoints that are loaded without running code and survive corruption, runs that
stop cleanly on SIGINT/SIGTERM and resume exactly, and run folders that two processes cannot
share."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import bnkernels
from bnkernels.cli import main
from bnkernels.experiments.batch import PORTABLE_CPU_ENV, run_many
from bnkernels.experiments.runfiles import (
    CheckpointError,
    FolderLockedError,
    atomic_write,
    folder_lock,
    load_checkpoint,
    save_checkpoint,
)
from bnkernels.experiments.stopping import Interrupted
from bnkernels.experiments.train import (
    CONFIGS,
    MetricsWriter,
    read_metrics,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def cpu_env(**extra) -> dict:
    """A fresh process's environment as on a CPU-only machine where the user set nothing: no
    GPU visible, no interpreter, no backend; this checkout's bnkernels first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "BNKERNELS_BACKEND")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(PORTABLE_CPU_ENV)  # what run_many's workers get, for every process
    env.update(extra)
    return env


def run_cli(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnkernels", *args], capture_output=True,
                          text=True, env=cpu_env(**env), timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------- demo on a CPU


def test_demo_runs_on_a_cpu_from_a_fresh_process():
    """`bnkernels demo` with nothing set: bnkernels' CPU path (the cpu backend), matching
    torch."""
    out = run_cli("demo", "--steps", "2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "backend 'cpu' (its CPU path" in out.stdout and "MATCH" in out.stdout
    assert "Traceback" not in out.stderr


def test_demo_runs_the_triton_kernels_in_the_interpreter_on_a_cpu():
    """`--backend triton` without a GPU: this process imported triton without the interpreter,
    so the demo reruns itself in a child that has it on from the start."""
    out = run_cli("demo", "--steps", "1", "--backend", "triton")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "backend 'triton' (Triton interpreter)" in out.stdout and "MATCH" in out.stdout


def test_interpreter_switched_on_too_late_is_a_clear_error():
    """TRITON_INTERPRET=1 set after triton was imported: the triton backend says so (and what
    to do) instead of failing inside a kernel; "auto" keeps to the CPU path (cpu backend)."""
    code = (
        "import os, torch, bnkernels as bnk\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "bnk.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)\n"
        "print('auto ok', bnk.backends.select('batch_norm', x).name)\n"
        "bnk.set_backend('triton')\n"
        "try:\n"
        "    bnk.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)\n"
        "except RuntimeError as e:\n"
        "    print('error:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cpu_env(), timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "auto ok cpu" in out.stdout
    assert "error:" in out.stdout and "set TRITON_INTERPRET=1 before the process" in out.stdout


# ----------------------------------------------------------------------------- checkpoints

TINY = dataclasses.replace(CONFIGS["tiny"], steps=8, checkpoint_every=2, keep_checkpoints=3,
                           hessian_every=0, landscape_every=0)


@pytest.fixture(autouse=True)
def _reference_backend(_restore_backend):
    """The reference backend on one thread, as the runs of run_many use."""
    bnkernels.set_backend("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted TINY run: its metrics.jsonl bytes."""
    bnkernels.set_backend("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it
    try:
        run = train(TINY, tmp_path_factory.mktemp("full") / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
        bnkernels.set_backend("auto")
    return (run / "metrics.jsonl").read_bytes()


def _killed_run(tmp_path) -> Path:
    """TINY killed before step 7 of 8: checkpoints at steps 2, 4 and 6; metrics through step 6."""
    run = tmp_path / "run"
    train(TINY, run, stop_after=7, progress=False)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step_2.pt", "step_4.pt", "step_6.pt"]
    return run


class _Evil:
    """Unpickling this would create ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _corrupt(path: Path, how: str, tmp_path: Path) -> None:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif how == "malicious pickle":
        state = torch.load(path, weights_only=True)
        state["model"]["payload"] = _Evil(tmp_path / "PWNED")
        torch.save(state, path)
    elif how == "another run":
        state = torch.load(path, weights_only=True)
        state["config"]["lr"] = 0.5
        torch.save(state, path)
    elif how == "not a checkpoint":
        torch.save({"weight": torch.ones(3)}, path)
    elif how == "flipped tensor byte":  # one running_mean value changed; still unpickles
        state = torch.load(path, weights_only=True)
        key = next(k for k in state["model"] if k.endswith("running_mean"))
        data = state["model"][key].numpy().tobytes()
        at = good.find(data)
        assert at > 0 and good.find(data, at + 1) < 0
        path.write_bytes(good[:at + 1] + bytes([good[at + 1] ^ 0x10]) + good[at + 2:])
        assert not torch.equal(torch.load(path, weights_only=True)["model"][key],
                               state["model"][key])


CORRUPTIONS = ["truncated", "empty", "random bytes", "malicious pickle", "another run",
               "not a checkpoint", "flipped tensor byte"]
WHY = {"truncated": "not a readable torch checkpoint", "empty": "is empty",
       "random bytes": "not a readable torch checkpoint", "malicious pickle": "was refused",
       "another run": "another run config", "not a checkpoint": "not a bnkernels run checkpoint",
       "flipped tensor byte": "fails its checksum"}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_checkpoint_is_named_and_resume_falls_back(tmp_path, full_run, how):
    """The newest checkpoint spoiled: loading it raises CheckpointError naming the file (a
    malicious pickle runs nothing); resume warns and continues from the one before, and ends
    with exactly the metrics of the uninterrupted run."""
    run = _killed_run(tmp_path)
    newest = run / "checkpoints" / "step_6.pt"
    _corrupt(newest, how, tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(newest))) as err:
        load_checkpoint(newest, config=TINY.to_dict())
    assert WHY[how] in str(err.value)
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        train(TINY, run, resume=True, progress=False)
    assert not (tmp_path / "PWNED").exists()
    assert (run / "metrics.jsonl").read_bytes() == full_run
    assert (run / "done.json").is_file()
    assert load_checkpoint(newest)["step"] == 6  # rewritten by the resumed run


def test_every_checkpoint_bad_starts_over(tmp_path, full_run):
    run = _killed_run(tmp_path)
    for p in (run / "checkpoints").iterdir():
        p.write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        train(TINY, run, resume=True, progress=False)
    assert len([w for w in record if "is empty" in str(w.message)]) == 3
    assert (run / "metrics.jsonl").read_bytes() == full_run


def test_checkpoint_whose_metrics_are_gone_is_passed_over(tmp_path, full_run):
    """metrics.jsonl shorter than the newest checkpoint recorded (lines lost): resuming from
    it would leave a hole; the run resumes from the checkpoint the file still covers."""
    run = _killed_run(tmp_path)
    at4 = load_checkpoint(run / "checkpoints" / "step_4.pt")["metrics_bytes"]
    at6 = load_checkpoint(run / "checkpoints" / "step_6.pt")["metrics_bytes"]
    os.truncate(run / "metrics.jsonl", (at4 + at6) // 2)
    with pytest.warns(UserWarning, match="step_6.pt counts"):
        train(TINY, run, resume=True, progress=False)
    assert (run / "metrics.jsonl").read_bytes() == full_run


def test_checkpoints_are_written_atomically(tmp_path):
    """A write cut short leaves the old file whole and no temporary file."""
    path = tmp_path / "step_2.pt"
    save_checkpoint(path, {"step": 2})
    assert "checksum" in torch.load(path, weights_only=True)
    before = path.read_bytes()

    def fail(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["step_2.pt"]


def test_checkpoints_hold_only_plain_data(tmp_path):
    """What the weights-only loader accepts, on every torch the package supports: tensors,
    numbers, strings, lists and dicts (RNG states as uint8 tensors, the config as a dict)."""
    run = _killed_run(tmp_path)
    state = load_checkpoint(run / "checkpoints" / "step_6.pt", config=TINY.to_dict())
    plain = (torch.Tensor, int, float, str, bool, type(None))

    def check(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, (str, int)), where
                check(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]")
        else:
            assert isinstance(v, plain), f"{where}: {type(v).__name__}"

    check(state, "checkpoint")
    assert state["torch_rng"].dtype == torch.uint8


# ----------------------------------------------------------------------------- metrics, locks


def test_metrics_never_go_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    w.write({"kind": "train", "step": 3})
    w.write({"kind": "test", "step": 4})
    w.write({"kind": "ics", "step": 4})
    w.close()
    w = MetricsWriter(path)  # a reopened file starts from its last record
    with pytest.raises(RuntimeError, match="step 2 after step 4"):
        w.write({"kind": "train", "step": 2})
    w.close()
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by a hard kill
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 4, 4]


def test_a_run_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    with folder_lock(run):
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
            train(TINY, run, progress=False)
        with pytest.raises(FolderLockedError):
            with folder_lock(run):
                pass
    train(dataclasses.replace(TINY, steps=2), run, progress=False)  # free again


def test_sigterm_stops_a_run_at_its_last_checkpoint(tmp_path, full_run):
    """run_many with one job (one worker process): SIGTERM to the caller mid-run raises
    Interrupted, the folder holds the metrics up to its last checkpoint and nothing after,
    and a rerun finishes with the uninterrupted run's metrics (also trained by run_many: in
    this process, without the workers' floating-point environment, they would differ)."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    slow = dataclasses.replace(TINY, hessian_every=1)  # long enough steps to land in one

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(ckpts.glob("step_*.pt")):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    full = tmp_path / "full"
    run_many([(slow, full)], jobs=1, device="cpu", progress=False)
    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    try:
        with pytest.raises(Interrupted) as err:
            run_many([(slow, run)], jobs=1, device="cpu", progress=False)
    finally:
        killer.join()
    assert err.value.exit_code == 128 + signal.SIGTERM
    _assert_consistent(run)
    assert not (run / "done.json").exists()
    run_many([(slow, run)], jobs=1, device="cpu", progress=False)
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_cli_train_stopped_by_sigint_exits_130_and_resumes(tmp_path, full_run, capsys):
    """`bnkernels train` and one Ctrl-C (SIGINT) mid-run: exit status 130, a message saying
    how to continue, the folder back to its last checkpoint; --resume then finishes it with
    the uninterrupted run's metrics."""
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--run-dir", str(run), "--no-progress", "--steps", "8",
            "--checkpoint-every", "2", "--keep-checkpoints", "3", "--hessian-every", "0",
            "--landscape-every", "0"]

    def interrupt_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(run.glob("checkpoints/step_*.pt")):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=interrupt_after_first_checkpoint)
    killer.start()
    try:
        assert main(args) == 130
    finally:
        killer.join()
    err = capsys.readouterr().err
    assert "stopped (interrupted by SIGINT)" in err and "--resume" in err
    _assert_consistent(run)
    assert not (run / "done.json").exists()
    assert main(args + ["--resume"]) == 0
    assert (run / "metrics.jsonl").read_bytes() == full_run


def _assert_consistent(run: Path) -> None:
    """metrics.jsonl holds exactly what the newest checkpoint counts (nothing after it; nothing
    at all without a checkpoint), its steps never going back."""
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"),
                   key=lambda p: int(p.stem.split("_")[1])) if (run / "checkpoints").is_dir() \
        else []
    size = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
    expected = load_checkpoint(ckpts[-1])["metrics_bytes"] if ckpts else 0
    assert size == expected, f"{run}: metrics.jsonl has {size} bytes, checkpoint {expected}"
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(steps), f"{run}: steps out of order"
    assert not list(run.glob("**/*.tmp"))


# ----------------------------------------------------------------------------- reproduce, stopped

SUITE = ["reproduce", "--mode", "tiny", "--seeds", "0", "--steps", "12", "--dln-steps", "12",
         "--set", "hessian_every=0", "--dln-set", "hessian_every=0", "--dln-set",
         "landscape_every=0", "--device", "cpu", "--jobs", "2", "--no-progress", "--no-figures"]
"""The tiny suite (15 runs) at 12 steps, a checkpoint every 4, on two worker processes, without
its costliest measurements (Hessian, the DLN's landscape)."""


@pytest.fixture(scope="module")
def uninterrupted_suite(tmp_path_factory):
    """SUITE run without interruption with --jobs 1 (one worker process, its runs one after
    another): every run trains in a worker with PORTABLE_CPU_ENV and one thread, so this
    matches the --jobs 2 runs bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted") / "suite"
    r = run_cli(*[a if a != "2" else "1" for a in SUITE], "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _session_processes(sid: int) -> list[str]:
    """The live (not zombie) processes of session ``sid``, as "pid state command"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            found.append(f"{entry.name} {state} {cmd[:120]}")
    return found


def _wait_for(predicate, timeout: float, proc=None, what: str = "", show=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f": {show()}" if show is not None else ""))
        time.sleep(0.05)


def _start_suite(out: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as err:
        return subprocess.Popen([sys.executable, "-m", "bnkernels", *SUITE, "--out", str(out)],
                                env=cpu_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # its own session and process group


def _stop(proc: subprocess.Popen, sig: signal.Signals, group: bool, log: Path) -> float:
    """Send ``sig`` to the parent alone (as `kill PID`) or to its process group (as Ctrl-C in
    a terminal); check it exits with 128 + sig and leaves no process behind; the seconds it
    took to exit."""
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    t0 = time.monotonic()
    rc = proc.wait(timeout=120)
    seconds = time.monotonic() - t0
    assert rc == 128 + sig, log.read_text()[-3000:]
    assert f"interrupted by {sig.name}" in log.read_text()
    _wait_for(lambda: not _session_processes(proc.pid), 10, what="no process left",
              show=lambda: _session_processes(proc.pid))
    return seconds


def _check_folders(out: Path) -> list[str]:
    """Every run folder consistent (see _assert_consistent); the runs not finished."""
    meta = json.loads((out / "suite.json").read_text())
    for name in meta["runs"]:
        if (out / name).is_dir():
            _assert_consistent(out / name)
    return [name for name in meta["runs"] if not (out / name / "done.json").is_file()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopped_reproduce_leaves_no_worker_and_resumes_exactly(uninterrupted_suite, tmp_path,
                                                                capsys):
    """`bnkernels reproduce` (two worker processes) stopped three times mid-run, each time once
    a run has written a checkpoint: by SIGTERM to the parent alone, while a second
    reproduction of the same folder is refused; rerun, by SIGINT to its process group (one
    Ctrl-C); rerun, by SIGKILL to the parent. It exits with 128 + the signal within seconds
    (the killed one at once), no worker outlives it, and every run folder holds metrics up
    to its newest checkpoint and nothing after; the last rerun ends with metrics
    byte-identical to an uninterrupted suite's, run by run."""
    out, log = tmp_path / "suite", tmp_path / "stderr.txt"
    procs = []
    try:
        procs.append(_start_suite(out, log))
        _wait_for(lambda: any(out.glob("*/checkpoints/step_*.pt")), 300, procs[-1],
                  "the first checkpoint")
        assert main([*SUITE, "--out", str(out)]) == 2
        assert "in use by another bnkernels process" in capsys.readouterr().err
        took = [_stop(procs[-1], signal.SIGTERM, False, log)]
        assert _check_folders(out), "the suite was not interrupted"

        seen = set(out.glob("*/checkpoints/step_*.pt"))
        procs.append(_start_suite(out, log))
        _wait_for(lambda: set(out.glob("*/checkpoints/step_*.pt")) - seen, 300, procs[-1],
                  "a new checkpoint")
        took.append(_stop(procs[-1], signal.SIGINT, True, log))
        assert _check_folders(out), "the suite was not interrupted"

        # SIGKILL to the parent: it cannot stop its workers; they see it gone and stop
        # themselves, each folder back to its newest checkpoint.
        seen = set(out.glob("*/checkpoints/step_*.pt"))
        procs.append(_start_suite(out, log))
        _wait_for(lambda: set(out.glob("*/checkpoints/step_*.pt")) - seen, 300, procs[-1],
                  "a new checkpoint")
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait(timeout=60)
        t0 = time.monotonic()
        _wait_for(lambda: not _session_processes(procs[-1].pid), 30, what="orphans to end",
                  show=lambda: _session_processes(procs[-1].pid))
        took.append(time.monotonic() - t0)
        assert _check_folders(out), "the suite was not interrupted"
        print(f"stopped in {took[0]:.1f} s (SIGTERM), {took[1]:.1f} s (SIGINT); workers of "
              f"the killed parent gone {took[2]:.1f} s after it")
        assert max(took) < 30
    finally:
        for proc in procs:
            for line in _session_processes(proc.pid):
                os.kill(int(line.split()[0]), signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    again = run_cli(*SUITE, "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not _check_folders(out)
    for name in json.loads((out / "suite.json").read_text())["runs"]:
        assert ((out / name / "metrics.jsonl").read_bytes()
                == (uninterrupted_suite / name / "metrics.jsonl").read_bytes()), name
