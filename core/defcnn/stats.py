"""Uncertainty of measured rates: every rate the project prints comes with its interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

from defcnn.errors import ConfigError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Rate:
    """`successes` out of `trials`, with its Wilson score interval (95% by default).

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest at
    0/n and n/n, where attack success rates often sit.
    """

    successes: int
    trials: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.trials

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def wilson(successes: int, trials: int, z: float = Z_95) -> Rate:
    """The rate `successes / trials` and its Wilson score interval."""
    if trials < 1:
        raise ConfigError(f"a rate needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ConfigError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # min/max with p: at 0/n and n/n the bound is exactly the rate, not a rounding off it.
    return Rate(successes, trials, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))
