"""How the CUDA extension (``csrc/``) is built: sources, compiler flags, GPU architectures, and
the cache directory of just-in-time builds.

Shared by the JIT loader (:mod:`bnkernels.backends.cuda`) and ``setup.py``
(``BNKERNELS_BUILD_CUDA=1``), which loads this file by path: it imports nothing heavy at module
level.

Flags. ``-O3`` everywhere, and no ``--use_fast_math`` anywhere: the statistics need IEEE
sqrt/div, the noise needs accurate logf/cosf (the uniforms are bit-identical to the reference's,
the normals agree to its rounding), and the remaining elementwise kernels are memory bound, so
fast math would change results for no measurable gain. The one fast-math ingredient that is
safe, FMA contraction, is on by default (``--fmad=true``); the noise turns it off locally with
``__fmul_rn``/``__fadd_rn``.

Architectures. ``TORCH_CUDA_ARCH_LIST`` if set (e.g. ``"8.0;9.0"``, ``"9.0+PTX"``); otherwise the
visible GPUs' (a JIT build on a GPU machine compiles for that GPU only); with no GPU,
``DEFAULT_ARCHS`` ("8.0;9.0+PTX": SASS for sm_80 and sm_90, and sm_90's PTX, which the driver
compiles for newer GPUs such as sm_100 and sm_120 instead of failing with "no kernel image").
The build splits the kernels over several ``.cu`` files (ninja compiles them in parallel,
``MAX_JOBS``) and passes ``--threads`` to nvcc (``NVCC_THREADS``, default 2: the
architectures of one file in parallel).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXT_NAME = "bnkernels_cuda_ext"  # the JIT module; the prebuilt one is bnkernels._cuda_ext
PREBUILT = "bnkernels._cuda_ext"
SOURCES = ("bindings.cpp", "batch_norm.cu", "noisy.cu", "lp_norm.cu", "persistent.cu")
HEADERS = ("bnkernels.h", "common.cuh", "batch_norm.cuh")
DEFAULT_ARCHS = "8.0;9.0+PTX"  # PTX: GPUs newer than sm_90 JIT-compile it


def have_sources(root: Path | None = None) -> bool:
    root = CSRC if root is None else root
    return all((root / f).is_file() for f in SOURCES + HEADERS)


def find_sources() -> Path:
    """Where the C++/CUDA sources are: ``bnkernels/csrc`` inside an installed package (the wheel
    ships them there), else ``csrc/`` of the source checkout this package runs from (an
    editable install); the checkout's path when neither has them (build_reasons says so)."""
    installed = Path(__file__).resolve().parents[2] / "csrc"
    return installed if have_sources(installed) else ROOT / "csrc"


CSRC = find_sources()


@functools.lru_cache(maxsize=4)
def source_hash(root: Path = CSRC) -> str:
    """A short hash of the C++/CUDA sources (what a prebuilt extension is checked against)."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return "h" + h.hexdigest()[:16]


def arch_list() -> str:
    """The architectures to compile for (see the module docstring)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # no usable CUDA runtime: fall back to the default list
        pass
    return DEFAULT_ARCHS


def gencode_flags(archs: str) -> list[str]:
    """``-gencode`` flags for an arch list such as ``"8.0;9.0+PTX"`` (SASS, plus PTX for
    ``+PTX`` entries)."""
    flags = []
    for arch in re.split(r"[;\s]+", archs.strip()):
        if not arch:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if m is None:
            raise ValueError(f"bnkernels: cannot parse CUDA arch {arch!r} in {archs!r}")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"bnkernels: empty CUDA arch list {archs!r}")
    return flags


def cxx_flags(root: Path = CSRC) -> list[str]:
    # The C++ standard is torch's own (its headers need it); the .cu files include no torch.
    return ["-O3", f"-DBNK_SOURCE_HASH_ID={source_hash(root)}"]


def nvcc_flags(archs: str, root: Path = CSRC) -> list[str]:
    threads = os.environ.get("NVCC_THREADS", "2")
    return ["-O3", "-std=c++17", f"--threads={threads}", "-lineinfo",
            f"-DBNK_SOURCE_HASH_ID={source_hash(root)}", *gencode_flags(archs)]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/bnkernels`` (default ``~/.cache/bnkernels``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnkernels"


def build_key(archs: str, torch_version: str, cuda_version: str | None,
              root: Path = CSRC) -> str:
    """What a JIT build depends on: sources, flags, torch, CUDA, Python, architectures."""
    h = hashlib.sha256()
    for part in (source_hash(root), torch_version, str(cuda_version), archs,
                 f"{sys.version_info.major}.{sys.version_info.minor}",
                 " ".join(cxx_flags(root)),
                 " ".join(f for f in nvcc_flags(archs, root) if not f.startswith("--threads"))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_directory(archs: str, torch_version: str, cuda_version: str | None,
                    root: Path = CSRC) -> Path:
    return cache_root() / f"cuda-{build_key(archs, torch_version, cuda_version, root)}"
