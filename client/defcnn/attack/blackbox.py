"""Query-based black-box attacks against the endpoint, with the Adversarial Robustness
Toolbox's implementations (Square, HopSkipJump, Boundary, SimBA).

Every call the attack makes goes through our client (counted, budgeted, batched) via an
`Oracle` that also watches each query: the first query the endpoint misclassifies, and the
closest misclassified image so far. Numbers at any budget up to the run's maximum then come
from that trace, whatever the attack's internal schedule, and the budget is exact: the oracle
sends only the images that fit and then stops the attack.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defcnn.client.errors import QueryBudgetExceeded

QUERY_ATTACKS = ("square", "hopskipjump", "boundary", "simba")
DECISION_BASED = ("hopskipjump", "boundary")


class _BudgetSpent(Exception):
    """Raised inside the attack when this image's query budget is used up."""


@dataclass
class Trace:
    """What the endpoint answered while one image was attacked."""

    queries: int = 0
    first_success: int | None = None  # 1-based index of the first misclassified query
    improvements: list[tuple[int, float]] = field(default_factory=list)  # (query, best L2)
    best_adv: np.ndarray | None = None
    best_label: int | None = None  # what the endpoint answered for best_adv

    def best_l2_at(self, budget: int) -> float | None:
        """Smallest L2 of a misclassified query among the first `budget` queries."""
        best = None
        for q, l2 in self.improvements:
            if q > budget:
                break
            best = l2
        return best

    def to_dict(self) -> dict[str, Any]:
        """The trace for results.json and the trace file (`best_adv` is saved apart)."""
        return {
            "queries": self.queries,
            "first_success": self.first_success,
            "improvements": [list(p) for p in self.improvements],
            "best_label": self.best_label,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        best_adv = data.get("best_adv")
        return cls(
            queries=int(data["queries"]),
            first_success=data["first_success"],
            improvements=[(int(q), float(l2)) for q, l2 in data["improvements"]],
            best_adv=None if best_adv is None else np.asarray(best_adv, dtype=np.float32),
            best_label=data.get("best_label"),
        )


@dataclass(frozen=True)
class BudgetRow:
    """Query-attack numbers at one budget. `mean_queries` and `median_queries` are over the
    images fooled within the budget (None: none was); `median_l2` and `l2_found` are set
    for decision-based attacks only (median_l2 None: no adversarial found)."""

    budget: int
    images: int
    success_rate: float
    mean_queries: float | None
    median_queries: float | None
    median_l2: float | None = None
    l2_found: int | None = None


class Oracle:
    """The predict function ART calls: probabilities from the endpoint, one image's budget."""

    def __init__(self, predict_proba: Any, x0: np.ndarray, label: int, budget: int) -> None:
        self._predict = predict_proba
        self.x0 = x0.astype(np.float32)
        self.label = label
        self.budget = budget
        self.trace = Trace()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape((-1, *self.x0.shape))
        room = self.budget - self.trace.queries
        if room <= 0:
            raise _BudgetSpent
        sent = x[:room]
        probs = self._predict(sent)
        for row, p in zip(sent, probs, strict=True):
            self.trace.queries += 1
            if int(np.argmax(p)) != self.label:
                if self.trace.first_success is None:
                    self.trace.first_success = self.trace.queries
                l2 = float(np.linalg.norm((row - self.x0).ravel()))
                best = self.trace.improvements[-1][1] if self.trace.improvements else np.inf
                if l2 < best:
                    self.trace.improvements.append((self.trace.queries, l2))
                    self.trace.best_adv = row.copy()
                    self.trace.best_label = int(np.argmax(p))
        if len(sent) < len(x):
            raise _BudgetSpent
        return probs


def _make(name: str, estimator: Any, eps: float, budget: int) -> Any:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SimBA, SquareAttack

    if name == "square":
        return SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=budget, nb_restarts=1,
                            batch_size=1, verbose=False)  # fmt: skip
    if name == "hopskipjump":
        return HopSkipJump(estimator, targeted=False, norm=2, max_iter=budget, max_eval=1000,
                           init_eval=100, batch_size=64, verbose=False)  # fmt: skip
    if name == "boundary":
        return BoundaryAttack(estimator, targeted=False, max_iter=budget, delta=0.01,
                              epsilon=0.01, batch_size=64, verbose=False)  # fmt: skip
    if name == "simba":
        return SimBA(estimator, attack="px", max_iter=budget, epsilon=eps, batch_size=1,
                     verbose=False)  # fmt: skip
    raise ValueError(f"query attack must be one of {QUERY_ATTACKS}, got {name!r}")


def attack_one(
    name: str,
    predict_proba: Any,
    x0: np.ndarray,
    label: int,
    num_classes: int,
    *,
    budget: int,
    eps: float,
    seed: int,
) -> Trace:
    """Attack one float image [3, H, W] in [0, 1] until success or the budget runs out."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    oracle = Oracle(predict_proba, x0, label, budget)
    estimator = BlackBoxClassifierNeuralNetwork(
        oracle, input_shape=x0.shape, nb_classes=num_classes, clip_values=(0.0, 1.0)
    )
    attack = _make(name, estimator, eps, budget)
    y = np.eye(num_classes, dtype=np.float32)[[label]]
    np.random.seed(seed)  # ART's attacks draw from numpy's global generator
    logging.getLogger("art").setLevel(logging.ERROR)
    with (
        contextlib.suppress(_BudgetSpent, QueryBudgetExceeded),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        attack.generate(x0[None].astype(np.float32), y=y)
    return oracle.trace


def summarize(traces: list[Trace], budgets: list[int], *, decision_based: bool) -> list[BudgetRow]:
    """Per budget: success rate, mean/median queries of successes, median L2 if decision-based."""
    rows = []
    n = len(traces)
    for b in budgets:
        wins = [
            t.first_success for t in traces if t.first_success is not None and t.first_success <= b
        ]
        median_l2, l2_found = None, None
        if decision_based:
            l2 = [v for t in traces if (v := t.best_l2_at(b)) is not None]
            median_l2, l2_found = (float(np.median(l2)) if l2 else None), len(l2)
        rows.append(
            BudgetRow(
                budget=b,
                images=n,
                success_rate=len(wins) / n if n else float("nan"),
                mean_queries=float(np.mean(wins)) if wins else None,
                median_queries=float(np.median(wins)) if wins else None,
                median_l2=median_l2,
                l2_found=l2_found,
            )
        )
    return rows
