"""Test setup: without a GPU, Triton kernels run in the interpreter on the CPU.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set here, before
bnkernels' kernel modules are first imported (bnkernels loads them lazily).
"""

import os
import sys

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
