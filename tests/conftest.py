"""Test setup: without a GPU, Triton kernels run in the interpreter on the CPU.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here, before
bnkernels' kernel modules are first imported (bnkernels loads them lazily).

Without a GPU, the two compiles test_cuda_backend.py needs (nvcc building the extension, and
the host compiler building its CPU emulation; minutes each on 2 cores when the cache is cold)
start in the background once the session has collected them, so they use the core the mostly
single-threaded interpreted tests leave idle; the tests that need them wait for them
(``background_build``). BNKERNELS_TEST_BACKGROUND_BUILDS=0 builds in the tests instead.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import bnkernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _restore_backend():
    """Each test starts on "auto" with the default launch heuristics and may switch backends
    and strategies freely (helpers.use_backend)."""
    bnkernels.set_backend("auto")
    yield
    if "bnkernels.backends.triton.common" in sys.modules:
        sys.modules["bnkernels.backends.triton.common"]._OVERRIDES.clear()
    bnkernels.set_backend("auto")


# ----------------------------------------------------------------------------- background builds

_BUILDS: dict = {}
_TESTS = Path(__file__).resolve().parent


def toolkit_env() -> dict | None:
    """The environment of a CUDA build (CUDA_HOME defaulted to /usr/local/cuda), or None when
    no toolkit is to be found."""
    env = dict(os.environ)
    if not (env.get("CUDA_HOME") or env.get("CUDA_PATH")):
        if Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if not home or not Path(home, "bin", "nvcc").exists():
        return None
    return env


class _Build:
    """A build running in a subprocess; ``result()`` waits for it."""

    def __init__(self, args, env):
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(args, env=env, stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout: float = 1800) -> subprocess.CompletedProcess:
        if getattr(self, "done", None) is None:
            code = self.proc.wait(timeout=timeout)
            self.seconds = time.monotonic() - self.start
            self.out.seek(0)
            self.err.seek(0)
            self.done = subprocess.CompletedProcess(self.proc.args, code, self.out.read(),
                                                    self.err.read())
            self.close()
        return self.done

    def close(self):
        self.out.close()
        self.err.close()


def pytest_collection_finish(session):
    """Start the builds once the session is known to run test_cuda_backend.py's tests."""
    config = session.config
    if (hasattr(config, "workerinput") or torch.cuda.is_available()
            or os.environ.get("BNKERNELS_TEST_BACKGROUND_BUILDS", "1") == "0"
            or not any(item.path.name == "test_cuda_backend.py" for item in session.items)):
        return
    env = toolkit_env()
    if env is not None:
        _BUILDS["cuda"] = _Build([sys.executable, "-m", "bnkernels.backends.cuda", "build"], env)
    emu_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    _BUILDS["emulator"] = _Build(
        [sys.executable, "-c", "import cuda_emulator; cuda_emulator.build()"], emu_env)


def pytest_unconfigure(config):
    for build in _BUILDS.values():
        if build.proc.poll() is None:
            build.proc.kill()
            build.proc.wait()
        build.close()


@pytest.fixture(scope="session")
def background_build():
    """``background_build(name)``: the finished background build "cuda" or "emulator"
    (a CompletedProcess, with ``.seconds``), or None if it was not started."""
    def wait(name):
        build = _BUILDS.get(name)
        if build is None:
            return None
        result = build.result()
        result.seconds = build.seconds
        return result

    return wait


def pytest_terminal_summary(terminalreporter):
    """How many tests were skipped, and why (grouped by reason), whatever the -r flags: a
    skip is a test that did not run, and a run that skipped many must say so."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(
            longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.write_sep("-", f"{len(skipped)} skipped, by reason")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{n:5d}  {reason}")
