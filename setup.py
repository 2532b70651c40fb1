"""Packaging lives in pyproject.toml. This file does two things for the CUDA backend (csrc/):

- ``build_py`` copies ``csrc/`` into the built package as ``bnkernels/csrc``, so an installed
  wheel carries the sources its CUDA backend builds from on first use (a source checkout and an
  editable install use ``csrc/`` in place);
- the optional prebuilt extension, built only when BNKERNELS_BUILD_CUDA=1 (which needs torch
  and a CUDA toolkit in the build environment: ``BNKERNELS_BUILD_CUDA=1 pip install
  --no-build-isolation .``). Without it, ``pip install .`` needs no toolkit, and the cuda
  backend builds itself on first use (JIT, see bnkernels/backends/cuda/; ``pip install
  '.[cuda]'`` adds ninja) or reports why it cannot.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/'s C++/CUDA sources to <build>/bnkernels/csrc/."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ from the checkout
            return
        src = HERE / "csrc"
        if not src.is_dir():  # pragma: no cover - a broken sdist
            raise FileNotFoundError(f"{src} is missing: cannot ship the CUDA sources")
        dest = Path(self.build_lib) / "bnkernels" / "csrc"
        self.mkpath(str(dest))
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in CSRC_SUFFIXES:
                self.copy_file(str(f), str(dest / f.name))


def _cuda_extension():
    # The build configuration is shared with the JIT loader; load it by path (importing the
    # bnkernels package would import torch's whole stack and the package's own modules).
    spec = importlib.util.spec_from_file_location(
        "_bnkernels_cuda_build", HERE / "bnkernels" / "backends" / "cuda" / "build_config.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = cfg.arch_list()
    ext = CUDAExtension(
        name=cfg.PREBUILT,
        sources=[f"csrc/{s}" for s in cfg.SOURCES],
        include_dirs=[str(cfg.CSRC)],
        extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags(archs)},
    )
    return {"ext_modules": [ext], "build_ext": BuildExtension}


_ext = _cuda_extension() if os.environ.get("BNKERNELS_BUILD_CUDA", "0") == "1" else {}
_cmdclass = {"build_py": BuildPyWithCsrc}
if "build_ext" in _ext:
    _cmdclass["build_ext"] = _ext.pop("build_ext")
setup(cmdclass=_cmdclass, **_ext)
