"""The command line as a new user meets it on a CPU-only machine: `bnkernels demo` from a fresh
process, checkpoints that are loaded without running code and survive corruption, runs that
stop cleanly on SIGINT/SIGTERM and resume exactly, and run folders that two processes cannot
share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env(**extra) -> dict:
    """A fresh process's environment as on a CPU-only machine where the user set nothing: no
    GPU visible, no interpreter, no backend; this checkout's bnkernels first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "BNKERNELS_BACKEND")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    env.update(extra)
    return env


def run_cli(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnkernels", *args], capture_output=True,
                          text=True, env=cpu_env(**env), timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------- demo on a CPU


def test_demo_runs_on_a_cpu_from_a_fresh_process():
    """`bnkernels demo` with nothing set: bnkernels' CPU path, matching torch."""
    out = run_cli("demo", "--steps", "2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "backend 'reference'" in out.stdout and "MATCH" in out.stdout
    assert "Traceback" not in out.stderr


def test_demo_runs_the_triton_kernels_in_the_interpreter_on_a_cpu():
    """`--backend triton` without a GPU: this process imported triton without the interpreter,
    so the demo reruns itself in a child that has it on from the start."""
    out = run_cli("demo", "--steps", "1", "--backend", "triton")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "backend 'triton' (Triton interpreter)" in out.stdout and "MATCH" in out.stdout


def test_interpreter_switched_on_too_late_is_a_clear_error():
    """TRITON_INTERPRET=1 set after triton was imported: the triton backend says so (and what
    to do) instead of failing inside a kernel; "auto" keeps to the reference backend."""
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
    assert "auto ok reference" in out.stdout
    assert "error:" in out.stdout and "set TRITON_INTERPRET=1 before the process" in out.stdout
