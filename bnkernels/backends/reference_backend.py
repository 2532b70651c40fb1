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

    batch_norm_fwd = staticmethod(reference.batch_norm_reference_fwd)
    batch_norm_bwd = staticmethod(reference.batch_norm_reference_bwd)
