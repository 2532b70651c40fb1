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
    * stages for SyncBatchNorm: ``batch_norm_stats(x) -> (mean, var)``,
      ``batch_norm_apply(x, mean, invstd, weight, bias, activation, noise=None) -> y``,
      ``batch_norm_bwd_reduce(dy, x, mean, invstd, weight, bias, activation, noise=None)
      -> [sum(g), sum(g (x - mean))]``, ``batch_norm_bwd_dx(dy, x, mean, invstd, weight, bias,
      mean_sums, activation, noise=None) -> dx``.
    * ``lp_norm_fwd`` / ``lp_norm_bwd``: see :mod:`bnkernels.backends.reference`.

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


# Op families: each backend provides ``<family>_<stage>`` entry points for these.
FAMILIES = ("batch_norm", "lp_norm")


def _family(name: str) -> str:
    """The op family of an entry point name, or AttributeError (for __getattr__)."""
    for family in FAMILIES:
        if name.startswith(family + "_"):
            return family
    raise AttributeError(name)
