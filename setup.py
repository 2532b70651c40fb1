"""Packaging lives in pyproject.toml. This file is the hook for the optional CUDA extension
(csrc/), built only when BNKERNELS_BUILD_CUDA=1 (which needs torch and a CUDA toolkit in the
build environment: ``BNKERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``). Without it,
``pip install .`` needs no toolkit, and the cuda backend builds itself on first use (JIT, see
bnkernels/backends/cuda/) or reports why it cannot.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


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
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**(_cuda_extension() if os.environ.get("BNKERNELS_BUILD_CUDA", "0") == "1" else {}))
