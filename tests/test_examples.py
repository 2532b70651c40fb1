"""The scripts in examples/ run and pass their own checks (each exits 1 when bnkernels and its
reference disagree), at their small default sizes on the CPU's reference backend.

The ResNet drop-in and torch.compile scripts run in this process (``main(argv)``; compile with
the ``aot_eager`` backend, which needs no C++ compiler); the DDP script runs under torchrun with
2 gloo processes. About 40 s on a busy 2-core CPU, most of it torchrun's two processes.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnkernels as bnk

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def reference_backend():
    """The CPU path a user gets (the test session turns the Triton interpreter on)."""
    before = bnk.get_backend()
    bnk.set_backend("reference")
    yield
    bnk.set_backend(before)


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def test_resnet_drop_in(reference_backend, capsys):
    assert _main("resnet_drop_in.py")(["--device", "cpu", "--model", "small"]) == 0
    out = capsys.readouterr().out
    assert "12 BatchNorm2d layers converted" in out and "eval: max" in out


def test_compile(reference_backend, capsys):
    torch._dynamo.reset()
    try:
        assert _main("compile.py")(["--device", "cpu", "--backend", "aot_eager"]) == 0
    finally:
        torch._dynamo.reset()
    assert "running statistics equal" in capsys.readouterr().out


def test_ddp_syncbn_under_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(EXAMPLES / "ddp_syncbn.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(2 ranks x 4)" in done.stdout and "one process, whole batch" in done.stdout
