"""tools/gpu_check.py (``make gpu-check``) without a GPU: the stage runner's time budget kills
the whole process group, and the summary reads pytest's JUnit XML, a killed run's ``-v`` log
and the bench's targets. Fast: nothing heavy runs (the whole script is checked by hand with
``python tools/gpu_check.py --cpu``)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="2"
failures="1" skipped="1" tests="6"><testcase classname="" name="tests.test_plots"><error
message="collection failure">ImportError while importing test module '/r/tests/test_plots.py'.
E   ModuleNotFoundError: No module named 'matplotlib'</error></testcase>
<testcase classname="tests.test_a" name="test_ok[fp32-2x3]" />
<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">E assert
</failure></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped message="x" /></testcase>
<testcase classname="tests.test_a" name="test_err"><error message="failed on setup with
&quot;RuntimeError: boom&quot;">E RuntimeError: boom</error></testcase>
<testcase classname="tests.test_a.TestK" name="test_m" /></testsuite></testsuites>"""

# A pytest -v log with xdist, killed before the end (no final line, no XML).
XDIST_LOG = """collecting ... collected 5 items / 1 error
[gw0] [ 20%] PASSED tests/test_a.py::test_ok[fp32-2x3]
[gw1] [ 40%] FAILED tests/test_a.py::test_bad
[gw0] [ 60%] SKIPPED tests/test_a.py::test_skip
[gw1] [ 80%] ERROR tests/test_a.py::test_err
_____ ERROR collecting tests/test_plots.py _____
ImportError while importing test module '/r/tests/test_plots.py'.
Traceback:
E   ModuleNotFoundError: No module named 'matplotlib'
"""


def test_junit_counts_failures_and_missing_modules(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    r = gpu_check.parse_junit(path)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 1, 1, 1)
    assert [(f["kind"], f["test"]) for f in r["failures"]] == [
        ("failed", "tests/test_a.py::test_bad"), ("error", "tests/test_a.py::test_err")]
    assert r["not_collected"] == [{"file": "tests/test_plots.py",
                                   "missing_module": "matplotlib"}]
    assert r["complete"]


def test_a_killed_runs_log_gives_the_tests_that_finished():
    r = gpu_check.parse_log(XDIST_LOG)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (1, 1, 1, 1)
    assert {f["test"] for f in r["failures"]} == {"tests/test_a.py::test_bad",
                                                  "tests/test_a.py::test_err"}
    assert r["not_collected"] == [{"file": "tests/test_plots.py",
                                   "missing_module": "matplotlib"}]
    assert not r["complete"]
    plain = "tests/test_a.py::test_ok PASSED [ 50%]\ntests/test_a.py::test_bad FAILED [100%]\n" \
            "FAILED tests/test_a.py::test_bad - assert\n===== 1 failed, 1 passed in 0.5s =====\n"
    r = gpu_check.parse_log(plain)
    assert (r["passed"], r["failed"], r["complete"]) == (1, 1, True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent (init, here) has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_stage_over_budget_is_killed_with_its_children(tmp_path):
    """The budget ends the stage and every process it started (its process group)."""
    pidfile = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              f"time.sleep(60)")
    t0 = time.monotonic()
    s = gpu_check.run_stage("demo", [sys.executable, "-c", script], 2.0, tmp_path / "demo.log",
                            dict(os.environ))
    assert s["timed_out"] and s["rc"] != 0 and time.monotonic() - t0 < 15
    child = int(pidfile.read_text())
    for _ in range(50):  # the child is gone (or a zombie nobody reaped) within moments
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's child process survived its budget")
    assert "killed: over budget" in (tmp_path / "demo.log").read_text()
    ok = gpu_check.run_stage("ok", [sys.executable, "-c", "print('hi')"], 30.0,
                             tmp_path / "ok.log", dict(os.environ))
    assert ok["rc"] == 0 and not ok["timed_out"] and "hi" in (tmp_path / "ok.log").read_text()


def test_summary_lists_stages_failures_and_targets(tmp_path):
    tests = gpu_check.parse_log(XDIST_LOG)
    bench = {"performance_claims": True, "sections_done": ["overhead"], "elapsed_s": 12.0,
             "truncated": None, "rows": [], "e2e": [],
             "targets": [{"name": "host fwd+bwd per call", "value": 1.1, "limit": 1.2,
                          "compare": "<=", "met": True, "where": "32x64x8x8 fp32"},
                         {"name": "host fwd per call", "value": 1.7, "limit": 1.5,
                          "compare": "<=", "met": False, "where": None},
                         {"name": "kernels lp_vs_eager", "value": None, "limit": 3.0,
                          "compare": ">=", "met": None, "where": None}]}
    stages = [{"stage": "build", "rc": 0, "timed_out": False, "seconds": 50.0, "budget": 150},
              {"stage": "tests", "rc": -15, "timed_out": True, "seconds": 180.0,
               "budget": 180},
              gpu_check.skipped_stage("bench", "only 10 s left")]
    meta = {"date": "today", "commit": "abc", "cpu": False, "total_budget": 470,
            "env": {"gpu": "NVIDIA H200", "modules": {"matplotlib": False, "xdist": True}}}
    text, data = gpu_check.summarize(meta, stages, tests, bench,
                                     tmp_path / "2026-01-01-partial.json")
    assert text.startswith("# gpu-check: NVIDIA H200")
    assert "Optional modules missing here: matplotlib." in text
    assert "| tests | KILLED (over budget): 1 passed, 1 failed, 1 errors, 1 skipped, 1 files " \
           "not collected (incomplete) | 180 | 180 |" in text
    assert "| bench | skipped: only 10 s left |" in text
    assert "- failed: `tests/test_a.py::test_bad`" in text
    assert "PARTIAL" in text and "| host fwd per call | 1.700 | <= 1.5 | **FAIL** |" in text
    assert "Targets: 1 met, 1 not met, 1 not judged or not measured." in text
    assert data["bench"]["sections_done"] == ["overhead"] and data["tests"]["failed"] == 1


def test_out_gets_at_most_six_flat_files(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench" / "gpu").mkdir(parents=True)
    for name in ("summary.md", "summary.json", "env.log", "build.log", "tests.log",
                 "bench.log"):
        (work / name).write_text(name)
    result = work / "bench" / "gpu" / "2026-01-01.json"
    result.write_text("{}")
    (work / "bench" / "gpu" / "2026-01-01.md").write_text("# md")
    (work / "bench" / "gpu" / "2026-01-01-host.png").write_bytes(b"png")
    written = gpu_check.write_out(out, work, result)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written) == sorted(
        ["summary.md", "summary.json", "logs.tar.gz", "bench.tar.gz", "bench.json",
         "bench.md"])
    assert all(p.is_file() for p in out.iterdir())
    import tarfile

    with tarfile.open(out / "bench.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["bench/bench.log", "bench/gpu/2026-01-01-host.png",
                                          "bench/gpu/2026-01-01.json",
                                          "bench/gpu/2026-01-01.md"]
    assert gpu_check.bench_result(work / "bench") == ({}, result)
