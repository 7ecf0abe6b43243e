"""The Boundary figure: its bootstrap intervals, results.json round trips, and its text."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from defcnn.attack.blackbox import BudgetRow
from defcnn.attack.metrics import BoundaryFigure, boundary_figure
from defcnn.attack.report import _figure_text
from defcnn.attack.results import ModelQueryResult
from defcnn.stats import bootstrap


def _pairs(n: int, found: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """`n` clean images and closest adversarials for the first `found` of them."""
    rng = np.random.default_rng(seed)
    clean = rng.random((n, 3, 8, 8))
    adv: list[np.ndarray | None] = [
        np.clip(x + rng.normal(0, rng.uniform(0.01, 0.1), x.shape), 0, 1) if i < found else None
        for i, x in enumerate(clean)
    ]
    return clean, adv


def test_boundary_figure_has_bootstrap_intervals_around_mean_and_median() -> None:
    clean, adv = _pairs(40, 30)
    bf = boundary_figure(clean, adv)
    assert (bf.images, bf.missing) == (30, 10)
    pairs = zip(clean, adv, strict=True)
    values = [float(np.sum((a - x) ** 2) / x.size) for x, a in pairs if a is not None]
    assert bf.mean == pytest.approx(np.mean(values))
    assert bf.median == pytest.approx(np.median(values))
    assert bf.mean_ci is not None and bf.median_ci is not None
    assert bf.mean_ci[0] < bf.mean < bf.mean_ci[1]
    assert bf.median_ci[0] < bf.median < bf.median_ci[1]
    est = bootstrap(values, "mean", seed=0)  # the project's bootstrap, seed 0
    assert bf.mean_ci == (est.low, est.high)
    assert boundary_figure(clean, adv) == bf  # reproducible


def test_boundary_figure_without_adversarials_has_no_interval() -> None:
    clean, adv = _pairs(3, 0)
    bf = boundary_figure(clean, adv)
    assert (bf.images, bf.missing) == (0, 3)
    assert math.isnan(bf.mean) and math.isnan(bf.median)
    assert bf.mean_ci is None and bf.median_ci is None
    assert _figure_text(bf.mean, bf.mean_ci) == "-"


def _entry(figure: BoundaryFigure) -> ModelQueryResult:
    row = BudgetRow(budget=10, images=2, success_rate=0.5, mean_queries=4.0, median_queries=4.0)
    return ModelQueryResult(0.5, 2, 2, (row,), {}, boundary_figure=figure)


def test_results_round_trip_and_old_files_without_intervals() -> None:
    clean, adv = _pairs(10, 8)
    entry = _entry(boundary_figure(clean, adv))
    saved = json.loads(json.dumps(entry.to_dict()))
    assert isinstance(saved["boundary_figure"]["mean_ci"], list)
    assert ModelQueryResult.from_dict(saved) == entry
    old = saved | {"boundary_figure": {"mean": 1e-4, "median": 8e-5, "images": 8, "missing": 2}}
    figure = ModelQueryResult.from_dict(old).boundary_figure
    assert figure == BoundaryFigure(mean=1e-4, median=8e-5, images=8, missing=2)
    assert figure.mean_ci is None and figure.median_ci is None
    assert asdict(figure)["median_ci"] is None


def test_figure_text_is_e_notation_with_the_interval() -> None:
    assert _figure_text(1.234e-4, (1.0e-4, 1.5e-4)) == "1.23e-04 [1.00e-04, 1.50e-04]"
    assert _figure_text(1.234e-4, None) == "1.23e-04"  # an old file: no interval
