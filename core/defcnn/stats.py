"""Uncertainty of measured rates: every rate the project prints comes with its interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from defcnn.errors import ConfigError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
_BLOCK = 1 << 20  # bootstrap draws per block: bounds memory for large samples


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


def rate_of(fraction: float, trials: int) -> Rate:
    """The Wilson rate of a stored fraction over `trials` (results files keep fractions; the
    count is recovered exactly, since fraction * trials is within rounding of an integer)."""
    return wilson(round(fraction * trials), trials)


@dataclass(frozen=True)
class Estimate:
    """A measured number and its 95% interval, so the two always travel together."""

    value: float
    low: float
    high: float

    def text(self, fmt: str = ".3f") -> str:
        """`value [low, high]` in format `fmt` (".2e" for tiny numbers such as L2^2/(3HW))."""
        return f"{self.value:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True)
class Difference(Estimate):
    """A difference of two estimates; shown signed, as the sign is what a reader looks for."""

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval leaves out 0: the difference is resolved at 95%."""
        return self.low > 0 or self.high < 0

    @property
    def sign(self) -> int:
        """+1 when the whole interval is above 0, -1 when below, 0 when it straddles 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self, fmt: str = ".3f") -> str:
        return f"{self.value:+{fmt}} [{self.low:+{fmt}}, {self.high:+{fmt}}]"

    def __str__(self) -> str:
        return self.text()


def difference(a: Rate, b: Rate) -> Difference:
    """`a.value - b.value` with Newcombe's hybrid score interval (Newcombe 1998, method 10).

    Built from the two Wilson intervals, so it inherits their good behaviour near 0 and 1.
    It assumes independent samples; for two models scored on the same images (positively
    correlated) it is conservative (wider than the paired interval), which is the safe side.
    """
    d = a.value - b.value
    low = d - math.hypot(a.value - a.low, b.high - b.value)
    high = d + math.hypot(a.high - a.value, b.value - b.low)
    return Difference(d, low, high)


def difference_of_differences(a: Rate, b: Rate, c: Rate, d: Rate) -> Difference:
    """`(a - b) - (c - d)` with a 95% normal-approximation interval.

    For comparing two drops, e.g. how much more a corruption costs one model than another
    ((clean - corrupted) of one minus that of the other): a claim about the drop is not
    settled by the corrupted accuracies alone. The variance is the sum of the four
    p(1-p)/n, treating the four rates as independent. They share images, so it is
    conservative: the correlations that dominate (a with b and c with d, one model clean
    and corrupted; a with c and b with d, two models on the same images) enter with a minus
    sign and narrow the true interval (the cross pairs a-d and b-c widen it, but are weaker).
    """
    value = (a.value - b.value) - (c.value - d.value)
    var = sum(r.value * (1 - r.value) / r.trials for r in (a, b, c, d))
    half = Z_95 * math.sqrt(var)
    return Difference(value, value - half, value + half)


Statistic = Literal["mean", "median"]


def _sample(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ConfigError(f"{what} must be one-dimensional, got shape {x.shape}")
    if not len(x):
        raise ConfigError(f"{what} is empty: there is nothing to estimate")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} holds non-finite numbers (NaN or inf)")
    return x


def _check(statistic: str, resamples: int) -> None:
    if statistic not in ("mean", "median"):
        raise ConfigError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if resamples < 100:
        raise ConfigError(f"a 95% bootstrap interval needs >= 100 resamples, got {resamples}")


def _resampled(
    x: np.ndarray, statistic: Statistic, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """`statistic` of `resamples` resamples of `x` drawn with replacement, in blocks."""
    out = np.empty(resamples)
    rows = max(1, _BLOCK // len(x))
    reduce = np.mean if statistic == "mean" else np.median
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        out[start:stop] = reduce(x[rng.integers(0, len(x), (stop - start, len(x)))], axis=1)
    return out


def _percentile(value: float, draws: np.ndarray) -> Estimate:
    low, high = np.percentile(draws, [2.5, 97.5])
    # min/max with value: the percentile interval can miss the point estimate by rounding
    # (or, for a median of few values, by a little more); a shown interval always holds it.
    return Estimate(value, min(value, float(low)), max(value, float(high)))


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Statistic,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """The mean or median of `values` with its percentile-bootstrap 95% interval.

    For numbers with no closed-form interval (medians, skewed distances): resampled with
    replacement, seeded so a report reproduces. One value gives a zero-width interval.
    """
    _check(statistic, resamples)
    x = _sample(values, "values")
    value = float(np.mean(x) if statistic == "mean" else np.median(x))
    rng = np.random.default_rng(seed)
    return _percentile(value, _resampled(x, statistic, resamples, rng))


def bootstrap_ratio(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    statistic: Statistic,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """`statistic(a) / statistic(b)` with its percentile-bootstrap 95% interval.

    For "how many times larger" comparisons of two models (e.g. the paper's ratio of
    Boundary figures); `a` and `b` are resampled independently (independent samples).
    """
    _check(statistic, resamples)
    xa, xb = _sample(a, "a"), _sample(b, "b")
    reduce = np.mean if statistic == "mean" else np.median
    denom = float(reduce(xb))
    if denom == 0:
        raise ConfigError(f"the {statistic} of b is 0: the ratio is undefined")
    rng = np.random.default_rng(seed)
    num_draws = _resampled(xa, statistic, resamples, rng)
    den_draws = _resampled(xb, statistic, resamples, rng)
    zeros = int((den_draws == 0).sum())
    if zeros:
        raise ConfigError(
            f"the {statistic} of b is 0 in {zeros} of {resamples} resamples: the ratio has "
            "no bounded interval"
        )
    return _percentile(float(reduce(xa)) / denom, num_draws / den_draws)
