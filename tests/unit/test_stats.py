"""Wilson, Newcombe and bootstrap intervals: known values, the edges, bad input refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defcnn.errors import ConfigError
from defcnn.stats import (
    Difference,
    Estimate,
    bootstrap,
    bootstrap_ratio,
    difference,
    difference_of_differences,
    wilson,
)


def test_matches_a_published_value() -> None:
    # Newcombe (1998), Table I: 81 of 263 -> 0.2553 to 0.3662 (95%).
    rate = wilson(81, 263)
    assert rate.low == pytest.approx(0.2553, abs=1e-4)
    assert rate.high == pytest.approx(0.3662, abs=1e-4)
    assert str(rate) == "0.308 [0.255, 0.366]"


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (0, 1), (1, 1)])
def test_edges_stay_inside_zero_one_and_contain_the_rate(k: int, n: int) -> None:
    rate = wilson(k, n)
    assert 0.0 <= rate.low <= rate.value <= rate.high <= 1.0
    assert rate.high - rate.low > 0  # 0/n is not a certain zero


def test_narrows_as_trials_grow() -> None:
    assert wilson(500, 1000).high - wilson(500, 1000).low < wilson(5, 10).high - wilson(5, 10).low


@pytest.mark.parametrize(("k", "n"), [(0, 0), (-1, 5), (6, 5)])
def test_bad_counts_are_refused(k: int, n: int) -> None:
    with pytest.raises(ConfigError):
        wilson(k, n)


def test_estimate_text() -> None:
    est = Estimate(0.80234, 0.7941, 0.81)
    assert str(est) == "0.802 [0.794, 0.810]"
    assert Estimate(1.234e-4, 1e-4, 1.5e-4).text(".2e") == "1.23e-04 [1.00e-04, 1.50e-04]"


def test_newcombe_difference_matches_the_published_example() -> None:
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80 = 0.2000; method 10 (hybrid
    # score, from the Wilson intervals): 0.0524 to 0.3339.
    d = difference(wilson(56, 70), wilson(48, 80))
    assert isinstance(d, Difference)
    assert d.value == pytest.approx(0.2000, abs=1e-3)
    assert d.low == pytest.approx(0.0524, abs=1e-3)
    assert d.high == pytest.approx(0.3339, abs=1e-3)
    assert str(d) == "+0.200 [+0.052, +0.334]"
    assert d.excludes_zero and d.sign == 1


def test_difference_sign_and_zero() -> None:
    down = difference(wilson(48, 80), wilson(56, 70))
    assert down.sign == -1 and down.excludes_zero
    assert str(down) == "-0.200 [-0.334, -0.052]"
    same = difference(wilson(5, 10), wilson(5, 10))
    assert same.value == 0 and same.low < 0 < same.high
    assert same.sign == 0 and not same.excludes_zero
    assert Difference(0.5, 0.2, 0.7).text(".1f") == "+0.5 [+0.2, +0.7]"


def test_difference_at_the_edges_stays_finite() -> None:
    d = difference(wilson(10, 10), wilson(0, 10))
    assert d.value == 1.0 and 0 < d.low < d.value and d.high == pytest.approx(1.0)


def test_difference_of_differences_by_hand() -> None:
    # (0.8 - 0.5) - (0.9 - 0.7) = 0.1; variance (0.16 + 0.25 + 0.09 + 0.21) / 100 = 0.0071,
    # so the half-width is 1.96 * sqrt(0.0071) = 0.1651.
    d = difference_of_differences(
        wilson(80, 100), wilson(50, 100), wilson(90, 100), wilson(70, 100)
    )
    assert isinstance(d, Difference)
    assert d.value == pytest.approx(0.1)
    assert d.low < d.value < d.high
    assert d.low == pytest.approx(-0.0651, abs=1e-4)
    assert d.high == pytest.approx(0.2651, abs=1e-4)
    assert d.sign == 0 and str(d) == "+0.100 [-0.065, +0.265]"


def test_difference_of_differences_sign() -> None:
    # One model drops 0.9 -> 0.3, the other 0.9 -> 0.8: the first drop is larger, resolved.
    big, small = (wilson(900, 1000), wilson(300, 1000)), (wilson(900, 1000), wilson(800, 1000))
    more = difference_of_differences(*big, *small)
    assert more.value == pytest.approx(0.5) and more.sign == 1
    less = difference_of_differences(*small, *big)
    assert less.value == pytest.approx(-0.5) and less.sign == -1
    assert (less.low, less.high) == pytest.approx((-more.high, -more.low))
    # Equal drops from different levels: the value is 0, not resolved.
    same = difference_of_differences(wilson(9, 10), wilson(5, 10), wilson(6, 10), wilson(2, 10))
    assert same.value == pytest.approx(0.0) and same.sign == 0


def _skewed(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, 1.0, n)


@pytest.mark.parametrize("statistic", ["mean", "median"])
def test_bootstrap_contains_the_value_and_shrinks_with_more_data(statistic: str) -> None:
    small = bootstrap(_skewed(30), statistic)  # type: ignore[arg-type]
    large = bootstrap(_skewed(3000), statistic)  # type: ignore[arg-type]
    for est in (small, large):
        assert est.low < est.value < est.high
    assert large.high - large.low < (small.high - small.low) / 3
    data = _skewed(30)
    assert small.value == pytest.approx(np.mean(data) if statistic == "mean" else np.median(data))


def test_bootstrap_mean_interval_is_near_the_normal_one() -> None:
    x = np.random.default_rng(2).normal(5.0, 2.0, 400)
    est = bootstrap(x, "mean")
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert est.high - est.low == pytest.approx(2 * half, rel=0.15)


def test_bootstrap_is_reproducible_per_seed() -> None:
    x = list(_skewed(50))
    assert bootstrap(x, "mean", seed=3) == bootstrap(np.array(x), "mean", seed=3)
    assert bootstrap(x, "mean", seed=3) != bootstrap(x, "mean", seed=4)
    assert bootstrap(x, "median", resamples=500) == bootstrap(x, "median", resamples=500)


def test_bootstrap_of_one_value_collapses() -> None:
    assert bootstrap([0.25], "mean") == Estimate(0.25, 0.25, 0.25)
    assert bootstrap([0.25], "median") == Estimate(0.25, 0.25, 0.25)
    assert bootstrap([2.0] * 7, "mean") == Estimate(2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ([1.0, float("nan")], {}, "non-finite"),
        ([1.0, float("inf")], {}, "non-finite"),
        ([1.0, 2.0], {"resamples": 99}, "resamples"),
        ([[1.0, 2.0]], {}, "one-dimensional"),
        ([1.0, 2.0], {"statistic": "max"}, "statistic"),
    ],
)
def test_bootstrap_refuses_bad_input(values: list, kwargs: dict, match: str) -> None:
    kwargs = {"statistic": "mean", **kwargs}
    with pytest.raises(ConfigError, match=match):
        bootstrap(values, **kwargs)


def test_bootstrap_ratio() -> None:
    a, b = _skewed(2000, seed=5) * 4.7, _skewed(2000, seed=6)  # true ratio 4.7
    for statistic in ("mean", "median"):
        est = bootstrap_ratio(a, b, statistic)
        reduce = np.mean if statistic == "mean" else np.median
        assert est.value == pytest.approx(reduce(a) / reduce(b))
        assert est.low < est.value < est.high
        assert est.low < 4.7 < est.high
    assert bootstrap_ratio(a, b, "mean", seed=1) == bootstrap_ratio(a, b, "mean", seed=1)
    assert bootstrap_ratio([3.0], [1.5], "median") == Estimate(2.0, 2.0, 2.0)


def test_bootstrap_ratio_refuses_a_zero_denominator_and_bad_input() -> None:
    with pytest.raises(ConfigError, match="median of b is 0"):
        bootstrap_ratio([1.0, 2.0], [0.0, 0.0, 1.0], "median")
    with pytest.raises(ConfigError, match="resamples"):
        bootstrap_ratio([1.0, 2.0], [0.0, 0.0, 0.0, 5.0], "mean")  # all-zero resamples
    with pytest.raises(ConfigError, match="empty"):
        bootstrap_ratio([1.0], [], "mean")
    with pytest.raises(ConfigError, match="non-finite"):
        bootstrap_ratio([float("nan")], [1.0], "mean")


def test_rate_of_recovers_the_count_of_a_stored_fraction() -> None:
    from defcnn.stats import rate_of

    assert rate_of(351 / 359, 359) == wilson(351, 359)
    assert rate_of(0.1 + 0.2, 10) == wilson(3, 10)  # 0.30000000000000004 still means 3 of 10
