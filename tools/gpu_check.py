"""``make gpu-check``: a contributor's one-command check on a CUDA machine, within 8 minutes.

Run from the repository root on a machine with torch and triton (no .venv needed; the stages
run with ``PYTHONPATH=<repo root>`` and this interpreter):

    python3 tools/gpu_check.py            # or: make gpu-check [PYTHON=python]

Stages, each in its own process group under its own time budget (killed with the whole group
when it runs over; a later stage runs whatever happened to an earlier one):

1. ``env``    versions, the GPU, which optional test modules import (matplotlib, hypothesis,
              scikit-learn, pytest-xdist, pytest-timeout, ...).
2. ``build``  ``python -m bnkernels.backends.cuda build`` (the CUDA extension, timed).
3. ``tests``  the whole suite on CUDA: ``pytest tests -n 8 --dist loadgroup`` (pytest-xdist if
              it imports), ``--timeout`` per test (pytest-timeout if it imports),
              ``-p no:cacheprovider``, a JUnit XML; test files that cannot import an optional
              module are reported as not collected, with the module.
4. ``bench``  ``python -m bnkernels.benchmarking --quick`` (overhead, e2e and CUDA-graph kernel
              sections, the targets) with a ``--time-limit`` inside the stage's budget; if the
              stage is killed, the sections finished so far are read from the partial file.

Then ``summary.md`` / ``summary.json`` (per stage: result and seconds; test counts and the
failures' names; the bench targets with pass/fail) in the work folder (default
``build/gpu-check``), and, when ``$OUT`` is set, at most 6 files in it: the two summaries,
``bench.json`` and ``bench.md``, ``logs.tar.gz`` (env, build, test logs, JUnit XML) and
``bench.tar.gz`` (the bench's JSON, markdown, PNGs and log).

Budgets (seconds; options override): total 470, env 40, build 150, tests 180, bench the rest
less 20 (at most 240). ``--cpu`` runs the same stages on the CPU (tests on the CPU, ``bench
--device cpu``) to check this script without a GPU; ``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("matplotlib", "hypothesis", "sklearn", "expecttest", "xdist", "pytest_timeout",
            "pytest_benchmark", "ninja", "numpy")
STAGES = ("env", "build", "tests", "bench")

ENV_SNIPPET = r"""
import importlib.util, json, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                else None)
except Exception as e:
    info["torch_error"] = repr(e)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton_error"] = repr(e)
info["modules"] = {m: importlib.util.find_spec(m) is not None for m in %(modules)r}
nvcc = shutil.which("nvcc")
info["nvcc"] = nvcc and subprocess.run([nvcc, "--version"], capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1]
print(json.dumps(info))
"""


# ----------------------------------------------------------------------------- running stages


def run_stage(name: str, cmd: list[str], budget: float, log: Path, env: dict) -> dict:
    """Run ``cmd`` in its own process group with ``budget`` seconds; past it, SIGTERM to the
    group, SIGKILL 10 s later. Output to ``log``. Returns the stage record."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n# budget {budget:.0f} s\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            rc = proc.returncode
        seconds = time.monotonic() - t0
        f.write(f"\n# exit {rc}{' (killed: over budget)' if timed_out else ''} after "
                f"{seconds:.1f} s\n")
    return {"stage": name, "rc": rc, "timed_out": timed_out, "seconds": round(seconds, 1),
            "budget": round(budget), "log": log.name, "command": shlex.join(cmd)}


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def skipped_stage(name: str, why: str) -> dict:
    return {"stage": name, "rc": None, "timed_out": False, "seconds": 0.0, "budget": 0,
            "log": None, "command": None, "skipped": why}


# ----------------------------------------------------------------------------- test results

_RESULT = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_TEST_ID = re.compile(r"(tests/\S+?\.py::\S+)")
_MISSING = re.compile(r"No module named '([\w.]+)'")


def _junit_id(tc: ET.Element) -> str:
    cls, name = tc.get("classname") or "", tc.get("name") or ""
    if not cls:  # a collection error: name is the module
        return name.replace(".", "/") + ".py"
    parts = cls.split(".")
    # "tests.test_x" or "tests.test_x.TestClass": the file is the first test_* part
    for i, part in enumerate(parts):
        if part.startswith("test_"):
            path = "/".join(parts[:i + 1]) + ".py"
            rest = "::".join(parts[i + 1:] + [name])
            return f"{path}::{rest}"
    return f"{cls}::{name}"


def parse_junit(path: Path) -> dict:
    """Counts, failure names and modules that were not collected, from pytest's JUnit XML."""
    out = {"source": "junit", "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "failures": [], "not_collected": [], "complete": True}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        test_id = _junit_id(tc)
        failure, error = tc.find("failure"), tc.find("error")
        if failure is not None:
            out["failed"] += 1
            out["failures"].append({"test": test_id, "kind": "failed",
                                    "message": (failure.get("message") or "")[:300]})
        elif error is not None:
            text = (error.get("message") or "") + "\n" + (error.text or "")
            missing = _MISSING.search(text)
            if "collection failure" in text and missing:
                out["not_collected"].append({"file": test_id, "missing_module":
                                             missing.group(1)})
            else:
                out["errors"] += 1
                out["failures"].append({"test": test_id, "kind": "error",
                                        "message": (error.get("message") or "")[:300]})
        elif tc.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def parse_log(text: str) -> dict:
    """The same from a ``pytest -v`` log (with or without xdist), for a run that was killed
    before it wrote its XML: the tests that finished."""
    out = {"source": "log", "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "failures": [], "not_collected": [], "complete": False}
    seen: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):  # short summary lines
            continue
        test, result = _TEST_ID.search(line), _RESULT.search(line)
        if test and result:
            seen[test.group(1)] = result.group(1)
    for test, result in seen.items():
        if result in ("PASSED", "XPASS"):
            out["passed"] += 1
        elif result in ("SKIPPED", "XFAIL"):
            out["skipped"] += 1
        else:
            out["failed" if result == "FAILED" else "errors"] += 1
            out["failures"].append({"test": test, "kind": result.lower(), "message": ""})
    for m in re.finditer(r"ImportError while importing test module '(?:[^']*/)?(tests/[^']+"
                         r"\.py)'.*?No module named '([\w.]+)'", text, re.DOTALL):
        out["not_collected"].append({"file": m.group(1), "missing_module": m.group(2)})
    out["complete"] = bool(re.search(r"=+ .*\b(passed|failed|error)\b.* in [\d.]+s", text))
    return out


def test_results(workdir: Path) -> dict | None:
    xml, log = workdir / "tests.xml", workdir / "tests.log"
    if xml.exists():
        try:
            return parse_junit(xml)
        except ET.ParseError:
            pass
    if log.exists():
        return parse_log(log.read_text(errors="replace"))
    return None


# ----------------------------------------------------------------------------- bench results


def bench_result(bench_dir: Path) -> tuple[dict | None, Path | None]:
    """The bench's final result file, else its partial file (a run killed mid-way)."""
    files = sorted(bench_dir.glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    final = [p for p in files if not p.name.endswith("-partial.json")]
    for path in (final or files)[-1:]:
        try:
            return json.loads(path.read_text()), path
        except ValueError:
            return None, path
    return None, None


# ----------------------------------------------------------------------------- summary


def _stage_result(s: dict, tests: dict | None) -> str:
    if s.get("skipped"):
        return f"skipped: {s['skipped']}"
    text = "ok" if s["rc"] == 0 else f"exit {s['rc']}"
    if s["timed_out"]:
        text = "KILLED (over budget)"
    if s["stage"] == "tests" and tests:
        text += (f": {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                 f"errors, {tests['skipped']} skipped"
                 + (f", {len(tests['not_collected'])} files not collected"
                    if tests["not_collected"] else "")
                 + ("" if tests["complete"] else " (incomplete)"))
    return text


def _bench_md(bench: dict | None, bench_path: Path | None) -> list[str]:
    lines = ["## Bench targets", ""]
    if bench is None:
        return lines + ["No bench results" + (f" ({bench_path.name} unreadable)" if bench_path
                                              else "") + ".", ""]
    partial = bench_path is not None and bench_path.name.endswith("-partial.json")
    done = bench.get("sections_done", bench.get("sections"))
    lines += [f"From `{bench_path.name}`" + (f" (PARTIAL: sections done {done})"
                                             if partial else "")
              + f"; {bench.get('elapsed_s', '?')} s; truncated: {bench.get('truncated')}; "
              f"performance claims: {bench.get('performance_claims')}.", "",
              "| target | measured | limit | met | where |", "|---|---|---|---|---|"]
    for t in bench.get("targets", []):
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "PASS", False: "**FAIL**", None: "-"}[t["met"]]
        lines.append(f"| {t['name']} | {value} | {t['compare']} {t['limit']} | {met} | "
                     f"{t['where'] or '-'} |")
    met = [t["met"] for t in bench.get("targets", [])]
    lines += ["", f"Targets: {met.count(True)} met, {met.count(False)} not met, "
                  f"{met.count(None)} not judged or not measured.", ""]
    fails = [r for r in bench.get("rows", []) if r.get("check") == "FAIL"]
    fails += [r for r in bench.get("e2e", []) if r.get("check") == "FAIL"]
    if fails:
        lines += [f"Bench correctness checks FAILED: {len(fails)} rows (see bench.md).", ""]
    return lines


def summarize(meta: dict, stages: list[dict], tests: dict | None, bench: dict | None,
              bench_path: Path | None, bench_ran: bool = True) -> tuple[str, dict]:
    env = meta.get("env") or {}
    title = env.get("gpu") or ("CPU (--cpu)" if meta["cpu"] else "no GPU seen")
    lines = [f"# gpu-check: {title}", "",
             f"{meta['date']}; commit {meta['commit']}; python {env.get('python')}, torch "
             f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}, nvcc: {env.get('nvcc')}.", ""]
    missing = [m for m, ok in (env.get("modules") or {}).items() if not ok]
    if missing:
        lines += [f"Optional modules missing here: {', '.join(missing)}.", ""]
    total = sum(s["seconds"] for s in stages)
    lines += [f"Total: {total:.0f} s of the {meta['total_budget']:.0f} s budget.", "",
              "| stage | result | seconds | budget |", "|---|---|---|---|"]
    for s in stages:
        result = _stage_result(s, tests if s["stage"] == "tests" else None)
        lines.append(f"| {s['stage']} | {result} | {s['seconds']:.0f} | {s['budget']} |")
    lines.append("")
    if tests:
        if tests["failures"]:
            lines += ["## Test failures", ""]
            lines += [f"- {f['kind']}: `{f['test']}`" + (f" -- {f['message']}"
                                                        if f["message"] else "")
                      for f in tests["failures"]]
            lines.append("")
        if tests["not_collected"]:
            lines += ["## Test files not collected (optional module missing)", ""]
            lines += [f"- `{n['file']}`: no module `{n['missing_module']}`"
                      for n in tests["not_collected"]]
            lines.append("")
    if bench_ran:
        lines += _bench_md(bench, bench_path)
    data = {"meta": meta, "stages": stages, "tests": tests,
            "bench": None if bench is None else {
                "file": bench_path.name, "targets": bench.get("targets"),
                "truncated": bench.get("truncated"), "sections_done": bench.get(
                    "sections_done"), "elapsed_s": bench.get("elapsed_s")}}
    return "\n".join(lines), data


# ----------------------------------------------------------------------------- archives


def write_out(out: Path, workdir: Path, bench_path: Path | None) -> list[Path]:
    """At most 6 files into ``out`` (no folders): summaries, bench.json/md, two archives."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("summary.md", "summary.json"):
        if (workdir / name).exists():
            written.append(Path(shutil.copy2(workdir / name, out / name)))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for name in ("env.log", "env.json", "build.log", "tests.log", "tests.xml"):
            if (workdir / name).exists():
                tar.add(workdir / name, arcname=f"logs/{name}")
    written.append(out / "logs.tar.gz")
    bench_files = sorted((workdir / "bench").glob("*/*"))
    if (workdir / "bench.log").exists() or bench_files:
        with tarfile.open(out / "bench.tar.gz", "w:gz") as tar:
            if (workdir / "bench.log").exists():
                tar.add(workdir / "bench.log", arcname="bench/bench.log")
            for f in bench_files:
                tar.add(f, arcname=f"bench/{f.parent.name}/{f.name}")
        written.append(out / "bench.tar.gz")
    if bench_path is not None:
        written.append(Path(shutil.copy2(bench_path, out / "bench.json")))
        md = bench_path.with_suffix(".md")
        if md.exists():
            written.append(Path(shutil.copy2(md, out / "bench.md")))
    return written


# ----------------------------------------------------------------------------- main


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true",
                   help="check this script on the CPU: tests and bench on the CPU (no claims)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"stages to run, of {','.join(STAGES)} (default: all; env always runs)")
    p.add_argument("--tests", nargs="*", default=["tests"], help="pytest paths (default tests)")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (default 8)")
    p.add_argument("--test-timeout", type=int, default=150,
                   help="pytest-timeout seconds per test (default 150)")
    p.add_argument("--total", type=float, default=470.0, help="total budget, s (default 470)")
    p.add_argument("--env-budget", type=float, default=40.0)
    p.add_argument("--build-budget", type=float, default=150.0)
    p.add_argument("--tests-budget", type=float, default=180.0)
    p.add_argument("--bench-budget", type=float, default=240.0,
                   help="at most this; the bench gets what the total leaves (less 20 s)")
    p.add_argument("--bench-args", default="",
                   help="extra arguments for the bench (e.g. '--sections overhead,e2e')")
    p.add_argument("--workdir", default=os.environ.get("GPU_CHECK_DIR",
                                                       str(ROOT / "build" / "gpu-check")))
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SystemExit(f"gpu_check: unknown stages {unknown}; choose from {STAGES}")
    workdir = Path(args.workdir)
    if not args.dry_run:
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
    py = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"  # the build's toolkit (torch may guess /usr/local)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _git_commit(),
            "cpu": args.cpu, "total_budget": args.total, "workdir": str(workdir),
            "python": py}

    def left() -> float:
        return args.total - (time.monotonic() - start)

    stages: list[dict] = []
    # env: always (seconds); it names the GPU and tells which pytest plugins import.
    env_info: dict = {}
    cmd = [py, "-c", ENV_SNIPPET % {"modules": OPTIONAL}]
    if args.dry_run:
        print(f"[env   {args.env_budget:>4.0f} s] {py} -c <versions snippet>")
    else:
        s = run_stage("env", cmd, min(args.env_budget, left()), workdir / "env.log", env)
        s["command"] = f"{py} -c <versions snippet>"
        text = (workdir / "env.log").read_text(errors="replace")
        found = [ln for ln in text.splitlines() if ln.startswith("{")]
        if found:
            env_info = json.loads(found[-1])
            (workdir / "env.json").write_text(json.dumps(env_info, indent=1) + "\n")
        if shutil.which("nvidia-smi"):
            try:
                smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                     timeout=20)
                smi_text = smi.stdout + smi.stderr
            except (OSError, subprocess.SubprocessError) as e:
                smi_text = f"failed: {e}\n"
            with open(workdir / "env.log", "a") as f:
                f.write("\n$ nvidia-smi\n" + smi_text)
        stages.append(s)
    meta["env"] = env_info
    modules = env_info.get("modules", {})

    if "build" in chosen:
        cmd = [py, "-m", "bnkernels.backends.cuda", "build"]
        if args.dry_run:
            print(f"[build {args.build_budget:>4.0f} s] {shlex.join(cmd)}")
        else:
            # leave the tests and the bench at least 110 and 90 s
            stages.append(run_stage("build", cmd, min(args.build_budget, left() - 200),
                                    workdir / "build.log", env))

    if "tests" in chosen:
        cmd = [py, "-m", "pytest", *args.tests, "-p", "no:cacheprovider", "-v",
               f"--junitxml={workdir / 'tests.xml'}", "--continue-on-collection-errors"]
        notes = []
        if modules.get("xdist", args.dry_run) and args.workers > 1:
            cmd += ["-n", str(args.workers), "--dist", "loadgroup"]
        else:
            notes.append("pytest-xdist missing: one process")
        if modules.get("pytest_timeout", args.dry_run):
            cmd += [f"--timeout={args.test_timeout}"]
        else:
            notes.append("pytest-timeout missing: only the stage budget")
        budget = min(args.tests_budget, left() - 110)  # the bench keeps at least 90 s
        if args.dry_run:
            print(f"[tests {args.tests_budget:>4.0f} s] {shlex.join(cmd)}")
        else:
            s = run_stage("tests", cmd, budget, workdir / "tests.log", env)
            s["notes"] = notes
            stages.append(s)

    bench_dir = workdir / "bench"
    if "bench" in chosen:
        budget = min(args.bench_budget, left() - 20)
        time_limit = max(20.0, budget - 65)
        cmd = [py, "-m", "bnkernels.benchmarking", "--quick", "--out", str(bench_dir),
               "--time-limit", f"{time_limit:.0f}"]
        if args.cpu:
            cmd += ["--device", "cpu"]
        cmd += shlex.split(args.bench_args)
        if args.dry_run:
            print(f"[bench {min(args.bench_budget, args.total - 20):>4.0f} s] {shlex.join(cmd)}"
                  " (time limit: the budget less 65 s)")
        elif left() - 20 < 30:
            stages.append(skipped_stage("bench", f"only {left():.0f} s of the total left"))
        else:
            stages.append(run_stage("bench", cmd, budget, workdir / "bench.log", env))
    if args.dry_run:
        print(f"total budget {args.total:.0f} s; work folder {workdir}; $OUT "
              f"{os.environ.get('OUT') or '(unset)'}")
        return 0

    tests = test_results(workdir) if "tests" in chosen else None
    bench, bench_path = bench_result(bench_dir) if "bench" in chosen else (None, None)
    text, data = summarize(meta, stages, tests, bench, bench_path, "bench" in chosen)
    (workdir / "summary.md").write_text(text + "\n")
    (workdir / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    out = os.environ.get("OUT")
    written = write_out(Path(out), workdir, bench_path) if out else []
    print(text)  # after every file is written: a closed stdout loses nothing
    if written:
        print(f"\n$OUT: {', '.join(p.name for p in written)}")
    print(f"\nwork folder: {workdir} ({time.monotonic() - start:.0f} s in all)")
    ok = all(s.get("rc") == 0 for s in stages if not s.get("skipped"))
    if "tests" in chosen:
        ok = ok and tests is not None and not tests["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
