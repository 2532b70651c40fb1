"""Build bnkernels' CUDA extension for the CPU emulator (``include/``), for tests on machines
without a GPU.

The very same ``csrc/`` sources are compiled by the host compiler with ``BNK_CPU_EMULATION``
and the stand-in CUDA headers of ``include/`` (every CUDA thread a coroutine, see
``include/emu.h``): the extension then runs the kernels on CPU tensors. This checks the kernels'
logic -- indexing, vector accesses, warp and block merges, the persistent grid barrier, the
Philox noise -- against the reference; it says nothing about GPU speed, and it is no substitute
for running on a GPU.

The build (about a minute on 2 cores) is cached like the real one, under
``$XDG_CACHE_HOME/bnkernels/emu-<hash>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from bnkernels.backends.cuda import build_config as cuda_build

INCLUDE = Path(__file__).resolve().parent / "include"
NAME = "bnkernels_cuda_emu"
FLAGS = ["-O2", "-ffp-contract=off", "-DBNK_CPU_EMULATION"]


def _key() -> str:
    h = hashlib.sha256(cuda_build.source_hash().encode())
    for f in sorted(INCLUDE.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def build(verbose: bool = False):
    """The emulated extension module (built on first use, then imported from the cache)."""
    directory = cuda_build.cache_root() / f"emu-{_key()}"
    library = directory / f"{NAME}.so"
    if not library.exists():
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        sources = []
        for name in cuda_build.SOURCES:
            src = cuda_build.CSRC / name
            if src.suffix == ".cu":  # compile the CUDA file as C++
                wrapper = directory / f"emu_{src.stem}.cpp"
                text = f'#include "{src}"\n'
                if not wrapper.exists() or wrapper.read_text() != text:
                    wrapper.write_text(text)
                src = wrapper
            sources.append(str(src))
        cpp_extension.load(
            name=NAME, sources=sources,
            extra_cflags=[*FLAGS, f"-I{INCLUDE}", f"-I{cuda_build.CSRC}",
                          f"-DBNK_SOURCE_HASH_ID={cuda_build.source_hash()}"],
            build_directory=str(directory), with_cuda=False, verbose=verbose)
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
