"""The noise distribution of noisy BatchNorm (Algorithm 1 of the paper)."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

from .errors import ValidationError


@dataclass(frozen=True)
class NoiseConfig:
    """The noise distribution of noisy BatchNorm (Algorithm 1 of Santurkar et al., 2018).

    At every step, per channel j: mu_j ~ U(-n_mu, n_mu), sigma_j ~ U(1, n_sigma); per element:
    m ~ U(mu_j - r_mu, mu_j + r_mu), s ~ N(sigma_j, r_sigma) (r_sigma a standard deviation).
    Defaults are the paper's constants."""

    n_mu: float = 0.5  # half-width of the per-channel mean shift
    n_sigma: float = 1.25  # upper end of the per-channel scale (lower end 1)
    r_mu: float = 0.1  # half-width of the per-element shift around mu_j
    r_sigma: float = 0.1  # standard deviation of the per-element scale around sigma_j

    def __post_init__(self):
        # Hashed on every noisy call (it is part of the plan's signature): once, here.
        object.__setattr__(self, "_hash", hash(astuple(self)))
        for name in ("n_mu", "r_mu", "r_sigma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValidationError(f"NoiseConfig: {name} must be finite and >= 0, got {v}")
        if not (math.isfinite(self.n_sigma) and self.n_sigma >= 1):
            raise ValidationError(
                f"NoiseConfig: n_sigma must be finite and >= 1, got {self.n_sigma}")

    def __hash__(self) -> int:
        return self._hash

    def expectation(self) -> tuple[float, float]:
        """(E[s], E[m]): E[s] = E[sigma_j] = (1 + n_sigma) / 2, E[m] = E[mu_j] = 0. Eval mode
        applies these in place of the noise (out = E[s] a + E[m]), as dropout's inference
        replaces its mask by the mask's mean: the next layers then see in eval what they saw
        on average in training, which their running statistics were gathered on."""
        return (1.0 + self.n_sigma) / 2.0, 0.0

    def as_list(self) -> list[float]:
        """[n_mu, n_sigma, r_mu, r_sigma], as the registered ops take it."""
        return [float(v) for v in astuple(self)]
