"""The demo's verdict: which target a row favours, given the direction that is better and
the difference's 95% interval; a difference whose interval holds zero is a tie."""

from __future__ import annotations

import pytest

from defcnn.demo.summary import DemoSummary, SummaryRow, Tally, verdict


def _row(low: float, high: float, better: str = "higher", measure: str = "m") -> SummaryRow:
    return SummaryRow("s", measure, 0.5, 0.5 + (low + high) / 2, better,  # type: ignore[arg-type]
                      difference=(low + high) / 2, difference_ci=(low, high))  # fmt: skip


@pytest.mark.parametrize(
    ("low", "high", "better", "favours"),
    [
        (0.05, 0.20, "higher", "defective"),  # defective larger, larger is better
        (-0.20, -0.05, "higher", "standard"),
        (-0.20, -0.05, "lower", "defective"),  # defective smaller, smaller is better
        (0.05, 0.20, "lower", "standard"),
        (-0.01, 0.20, "higher", "tie"),  # the interval holds zero
        (0.0, 0.20, "higher", "tie"),
        (-0.20, 0.0, "lower", "tie"),
    ],
)
def test_a_row_favours_a_target_only_beyond_its_interval(
    low: float, high: float, better: str, favours: str
) -> None:
    assert _row(low, high, better).outcome == favours


def test_a_row_without_an_interval_favours_nobody() -> None:
    assert SummaryRow("s", "m", 0.1, 0.2, "higher").outcome is None


def _summary(*, matched: bool, tally: Tally, success: SummaryRow) -> DemoSummary:
    clean = SummaryRow("clean", "test accuracy (whole test split)", 0.47, 0.46, "higher",
                       standard_ci=(0.45, 0.49), defective_ci=(0.44, 0.48),
                       difference=-0.01, difference_ci=(-0.04, 0.02))  # fmt: skip
    return DemoSummary(
        rows=(clean, success), transfer_tally=tally, surrogates=("s.safetensors",),
        transfer_images=500, query_images=100, dataset="d", queries={}, matched=matched,
        standard_stopped_at_epoch=2.5,
    )  # fmt: skip


def test_the_verdict_states_the_tally_the_match_and_the_query_outcome() -> None:
    success = _row(-0.3, -0.1, "lower", "success rate")
    text = verdict(_summary(matched=True, tally=Tally(6, 1, 2), success=success))
    assert "more robust in 6 of 9 settings, the standard one in 1, and 2 were ties" in text
    assert "after 2.50 epochs; comparable (within 0.02)" in text
    assert "the defective model resisted more" in text
    text = verdict(
        _summary(
            matched=False, tally=Tally(0, 0, 9), success=_row(-0.1, 0.1, "lower", "success rate")
        )
    )
    assert "NOT comparable" in text and "a tie" in text
