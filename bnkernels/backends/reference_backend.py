"""The eager PyTorch backend object (kernels in :mod:`bnkernels.backends.reference`)."""

from __future__ import annotations

from . import reference
from ._base import FLOAT_DTYPES, Backend


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, op, x, **inputs):
        if x.dtype not in FLOAT_DTYPES:
            return [f"dtype {x.dtype} is not supported"]
        return []

    def noisy_batch_norm_noise(self, x, noise):
        return reference.noisy_bn_noise_reference(x, noise)

    def __getattr__(self, name):
        """``<family>_fwd`` / ``_bwd`` are ``reference.<family>_reference_fwd`` / ``_bwd``."""
        family, _, kind = name.rpartition("_")
        if not family or kind not in ("fwd", "bwd") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(reference, f"{family}_reference_{kind}")
