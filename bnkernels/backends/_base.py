"""The interface every backend implements."""

from __future__ import annotations

import torch

# Input dtypes every backend is expected to take (fp64 mainly for gradcheck).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Backend:
    """A set of kernels for every op, with the reasons it cannot take a given input.

    Op entry points (same signatures in every backend):

    * ``batch_norm_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
      activation, noise=None) -> (y, save_mean, save_invstd)``; (y, None, None) in eval mode.
    * ``batch_norm_bwd(dy, x, mean, invstd, weight, bias, training, activation, needs,
      noise=None) -> (dx, dweight, dbias)``.
    * ``noisy_batch_norm_noise(x, noise) -> (s, m)``, the noise applied to ``x``.

    ``noise`` is ``(NoiseConfig, seed, step)`` for noisy BatchNorm, None for plain BatchNorm.
    """

    name: str = ""

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this machine (empty: it can)."""
        return []

    def not_supported_reasons(self, op: str, x: torch.Tensor, **inputs) -> list[str]:
        """Why this backend cannot run ``op`` on these inputs (empty: it can)."""
        return []

    def __repr__(self) -> str:
        return f"<bnkernels backend {self.name!r}>"
