"""The exceptions bnkernels raises for bad input.

Each is both the Python exception that says what is wrong (``ValueError`` for a bad value,
``TypeError`` for a bad type) and ``RuntimeError``, the type torch's own ops raise for bad
input: code written for torch (``except RuntimeError``) catches bnkernels' errors too, and
code that catches ``ValueError`` / ``TypeError`` keeps working. The messages are bnkernels'
own: they name the argument and the fix.
"""

from __future__ import annotations


class ValidationError(ValueError, RuntimeError):
    """A bad value (a shape, a size, a scalar out of range, an unknown name)."""


class ValidationTypeError(TypeError, RuntimeError):
    """A bad type (not a tensor, an unsupported dtype, mixed dtypes)."""
