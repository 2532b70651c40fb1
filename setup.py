"""Packaging lives in pyproject.toml. This file is the hook for the optional CUDA extension
(csrc/), built only when BNKERNELS_BUILD_CUDA=1; without it `pip install .` needs no toolkit."""

from setuptools import setup

setup()
