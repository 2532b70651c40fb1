"""The package as a user gets it: the sdist and the wheel carry the license and the CUDA sources,
and the wheel, installed into a fresh virtual environment, imports, reports one version, runs
its command line, and its CUDA backend finds the sources it builds from on first use.

The build runs on a copy of the checkout (no build output is left in the tree): the sdist
first, then the wheel from the unpacked sdist, so the sdist is shown to be complete. The fresh
environment sees this interpreter's site-packages through a ``.pth`` file (for torch and triton,
not reinstalled) and nothing else of the checkout. About 30 s on a busy 2-core CPU, most of
it two imports of torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp",
                                                                          ".h"))
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "data", "*.egg-info",
                               "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
                               ".benchmarks", "*.so")


def _run(cmd, cwd, env=None, timeout=180):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist path, wheel path), built from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("dists")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", tmp / "sdist"], cwd=src, env=env)
    (sdist,) = (tmp / "sdist").glob("bnkernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", tmp / "wheel", unpacked], cwd=tmp, env=env)
    (wheel,) = (tmp / "wheel").glob("bnkernels-*.whl")
    return sdist, wheel


def test_sdist_has_license_sources_and_builds(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                 "CHANGELOG.md", "CONTRIBUTING.md", "CITATION.cff",
                 "bnkernels/_version.py", "bnkernels/py.typed",
                 "bnkernels/backends/reference/philox.c", "bnkernels/backends/reference/philox.h",
                 "bnkernels/backends/cpu/kernels.c",
                 "bnkernels/backends/cpu/kernels_impl.h", *(f"csrc/{f}" for f in CSRC)):
        assert name in names, f"{name} missing from the sdist"
    assert not any(n.endswith((".so", ".pyc")) for n in names)


def test_wheel_has_license_sources_and_metadata(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    import bnkernels

    assert wheel.name.startswith(f"bnkernels-{bnkernels.__version__}-py3-none-any")
    for name in ("bnkernels/py.typed", "bnkernels/backends/cuda_speed.json",
                 "bnkernels/backends/reference/philox.c", "bnkernels/backends/reference/philox.h",
                 "bnkernels/backends/cpu/kernels.c",
                 "bnkernels/backends/cpu/kernels_impl.h", "bnkernels/experiments/criteria.json",
                 *(f"bnkernels/csrc/{f}" for f in CSRC)):
        assert name in names, f"{name} missing from the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert not any(n.startswith(("tests/", "csrc/", "examples/")) for n in names)
    for line in (f"Version: {bnkernels.__version__}", "License-Expression: MIT",
                 "Author: bnkernels contributors", 'Requires-Dist: ninja; extra == "cuda"',
                 "Requires-Dist: torch>=2.4"):
        assert line in metadata, f"{line!r} not in METADATA"


def test_wheel_installs_into_a_fresh_venv_and_its_cuda_backend_can_build(dists, tmp_path):
    _, wheel = dists
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).strip())
    # torch, triton, numpy, ninja from this interpreter's environment, appended after the
    # fresh one's own site-packages (its .pth files, e.g. an editable bnkernels, are not read)
    (purelib / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
          "-q", wheel], cwd=tmp_path, env=env)

    # `bnkernels env --json` in the fresh environment: where bnkernels and its sources are, and
    # why its CUDA backend could not build (nothing, given a toolkit and ninja)
    out = _run([py, "-m", "bnkernels", "env", "--json"], cwd=tmp_path, env=env)
    got = json.loads(out)
    assert got["bnkernels"]["location"] == str(purelib / "bnkernels"), got["bnkernels"]
    cuda = got["cuda_extension"]
    assert cuda["sources"] == str(purelib / "bnkernels" / "csrc") and cuda["sources_found"], cuda
    assert not any("sources" in r for r in cuda["build_reasons"]), cuda["build_reasons"]
    if got["torch_cuda"] and Path(env["CUDA_HOME"], "bin", "nvcc").exists():
        assert cuda["build_reasons"] == [], cuda["build_reasons"]  # it can build on first use
    assert got["optional"]["ninja"]["installed"]

    # the console script
    out = _run([env_dir / "bin" / "bnkernels", "--version"], cwd=tmp_path, env=env)
    assert out.strip() == f"bnkernels {got['bnkernels']['version']}"
