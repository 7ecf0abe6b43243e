"""Wilson intervals: known values, the edges, and bad input refused."""

from __future__ import annotations

import pytest

from defcnn.errors import ConfigError
from defcnn.stats import wilson


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
