"""The eager PyTorch backend object (kernels in :mod:`bnkernels.backends.reference`)."""

from __future__ import annotations

from . import reference
from ._base import FLOAT_DTYPES, Backend, _family


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, op, x, **inputs):
        if x.dtype not in FLOAT_DTYPES:
            return [f"dtype {x.dtype} is not supported"]
        return []

    def noisy_batch_norm_noise(self, x, noise):
        return reference.noisy_bn_noise_reference(x, noise)

    def __getattr__(self, name):
        """``<family>_<stage>`` is ``reference.<family>_reference_<stage>``."""
        family = _family(name)
        return getattr(reference, f"{family}_reference{name[len(family):]}")
