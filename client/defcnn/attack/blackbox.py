"""Query-based black-box attacks against the endpoint, with the Adversarial Robustness
Toolbox's implementations: Square and SimBA (they need scores), HopSkipJump, Boundary,
GeoDA and Sign-OPT (labels are enough).

Every query goes through an `Oracle`, one per image, that sends only what fits the image's
budget and watches each answer: the first query the endpoint misclassifies, and the
closest misclassified image so far. Numbers at any budget up to the run's maximum then come
from that trace, whatever the attack's internal schedule, and the budget is exact: the
oracle sends only the images that fit and then stops the attack.

`attack_images` attacks many images at once: one thread per image runs ART's attack on it
(ART loops over images internally, so one `generate` call would send one image's candidates
at a time), and a micro-batcher sends the candidates of all images in shared predict calls
(`defcnn.attack._querybatch`, which also says why results do not depend on the threads'
interleaving). Square is vectorised in ART and could run once over the whole batch, but its
random windows are then shared by all images, so an image's result would depend on which
other images it ran with; one thread per image keeps each image's attack the same whether
it runs alone, in a batch or in a resumed run.

Repeats are answered from memory, not sent: ART's Square asks for the current image's
scores twice per iteration besides the new candidate, so a query is a distinct image sent
(the endpoint is taken as deterministic; `memo=False` sends every repeat).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from defcnn.attack._querybatch import Batcher, ImageTurn, seed_random_starts
from defcnn.client.errors import QueryBudgetExceeded
from defcnn.errors import ConfigError

Threat = Literal["score", "decision"]
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AttackInfo:
    """What a query attack needs from the endpoint and what its budget means.

    threat: "score" needs scores (logits or probabilities); "decision" needs labels only.
    norm: the distance it works in; uses_eps: whether --eps bounds it (an L-inf ball), or
    it minimises the L2 distance of a misclassified image instead."""

    name: str
    title: str
    threat: Threat
    norm: Literal["linf", "l2"]
    uses_eps: bool
    paper: str


QUERY_ATTACKS: dict[str, AttackInfo] = {
    a.name: a
    for a in (
        AttackInfo("square", "Square", "score", "linf", True, "https://arxiv.org/abs/1912.00049"),
        AttackInfo("simba", "SimBA", "score", "linf", True, "https://arxiv.org/abs/1905.07121"),
        AttackInfo("hopskipjump", "HopSkipJump", "decision", "l2", False,
                   "https://arxiv.org/abs/1904.02144"),
        AttackInfo("boundary", "Boundary", "decision", "l2", False,
                   "https://arxiv.org/abs/1712.04248"),
        AttackInfo("geoda", "GeoDA", "decision", "l2", False, "https://arxiv.org/abs/2003.06468"),
        AttackInfo("signopt", "Sign-OPT", "decision", "l2", False,
                   "https://arxiv.org/abs/1909.10773"),
    )
}  # fmt: skip
DECISION_BASED = tuple(n for n, a in QUERY_ATTACKS.items() if a.threat == "decision")
THREATS: tuple[Threat, ...] = ("score", "decision")


def attacks_for(threat: str) -> tuple[str, ...]:
    """The attacks that can run against an endpoint answering `threat`: every attack on
    scores, the decision-based ones on labels only."""
    if threat not in THREATS:
        raise ConfigError(f"threat must be one of {THREATS}, got {threat!r}")
    return tuple(n for n, a in QUERY_ATTACKS.items() if threat == "score" or a.threat == threat)


def attack_info(name: str) -> AttackInfo:
    if name not in QUERY_ATTACKS:
        raise ConfigError(f"query attack must be one of {tuple(QUERY_ATTACKS)}, got {name!r}")
    return QUERY_ATTACKS[name]


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


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that are probabilities as they are, logits through a softmax (SimBA checks that
    it is given probabilities; argmax and Square's margin order are the same either way)."""
    is_prob = (scores >= 0).all(axis=1) & (np.abs(scores.sum(axis=1) - 1) < 1e-3)
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    soft = z / z.sum(axis=1, keepdims=True)
    return np.where(is_prob[:, None], scores, soft).astype(np.float32)


class Oracle:
    """The predict function ART calls for one image: sends what fits this image's budget,
    rounded to what the endpoint will see when asked, and records the trace.

    `send` returns the endpoint's scores, or one-hot labels for a label-only endpoint; a
    decision-based attack is given one-hot labels either way, so it uses nothing else."""

    def __init__(
        self,
        send: Predict,
        x0: np.ndarray,
        label: int,
        budget: int,
        *,
        num_classes: int,
        labels_only: bool = False,
        quantize: bool = False,
        linf_eps: float | None = None,
        memo: bool = True,
    ) -> None:
        self._send = send
        self.x0 = np.asarray(x0, dtype=np.float32)
        self.label = label
        self.budget = budget
        self.num_classes = num_classes
        self.labels_only = labels_only
        self.quantize = quantize
        self._memo: dict[Hashable, np.ndarray] | None = {} if memo else None
        self.trace = Trace()
        self._lo = self._hi = None
        if quantize and linf_eps is not None:  # the levels inside the eps-ball around x0
            tol = 1e-4  # eps*255 is a whole number up to float error: keep its level
            lo = np.ceil((self.x0 - linf_eps) * 255 - tol)
            hi = np.floor((self.x0 + linf_eps) * 255 + tol)
            self._lo, self._hi = np.clip(lo, 0, 255), np.clip(hi, 0, 255)
            empty = self._lo > self._hi  # only when eps < 1/255 and x0 is off the levels
            self._lo = np.where(empty, np.rint(self.x0 * 255), self._lo)
            self._hi = np.maximum(self._hi, self._lo)

    def sent_form(self, x: np.ndarray) -> np.ndarray:
        """What the endpoint is sent for candidates `x` [M, C, H, W]."""
        x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
        if not self.quantize:
            return x
        levels = np.rint(x * 255)
        if self._lo is not None:
            levels = np.clip(levels, self._lo, self._hi)
        return (levels / 255).astype(np.float32)

    def _answers(self, raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(raw, dtype=np.float32)
        if raw.shape != (n, self.num_classes):
            raise ValueError(f"predict must answer [{n}, {self.num_classes}], got {raw.shape}")
        labels = raw.argmax(axis=1)
        if self.labels_only:
            return np.eye(self.num_classes, dtype=np.float32)[labels], labels
        return _probabilities(raw), labels

    def __call__(self, x: np.ndarray) -> np.ndarray:
        sent = self.sent_form(np.asarray(x).reshape((-1, *self.x0.shape)))
        known = self._memo if self._memo is not None else {}
        keys: list[Hashable] = (
            [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in sent]
            if self._memo is not None
            else list(range(len(sent)))  # every row is a query, repeats included
        )
        new: dict[Hashable, int] = {}  # distinct rows not answered before -> first index
        for i, k in enumerate(keys):
            if k not in known and k not in new:
                new[k] = i
        fresh = list(new.values())[: max(0, self.budget - self.trace.queries)]
        answered: dict[Hashable, np.ndarray] = {}
        if fresh:
            scores, labels = self._answers(self._send(sent[fresh]), len(fresh))
            for i, p, lab in zip(fresh, scores, labels, strict=True):
                self._record(sent[i], int(lab))
                answered[keys[i]] = p
            if self._memo is not None:
                self._memo.update(answered)
        if len(fresh) < len(new):
            raise _BudgetSpent
        return np.stack([answered[k] if k in answered else known[k] for k in keys])

    def _record(self, row: np.ndarray, label: int) -> None:
        self.trace.queries += 1
        if label == self.label:
            return
        if self.trace.first_success is None:
            self.trace.first_success = self.trace.queries
        l2 = float(np.linalg.norm((row - self.x0).ravel()))
        best = self.trace.improvements[-1][1] if self.trace.improvements else np.inf
        if l2 < best:
            self.trace.improvements.append((self.trace.queries, l2))
            self.trace.best_adv = row.copy()
            self.trace.best_label = label


@functools.lru_cache(maxsize=8)
def _dct_basis(sub_dim: int, res: int) -> np.ndarray:
    """GeoDA's subspace: [res*res, sub_dim**2], column u*sub_dim+v the 2D DCT basis image of
    frequencies (u, v), as ART builds it (ART's builder needs np.mat, gone in NumPy 2)."""
    n = max(res, sub_dim)
    k = np.arange(sub_dim)[:, None]
    alpha = np.where(k == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    c = alpha * np.cos((2 * np.arange(res)[None, :] + 1) * k * np.pi / (2 * n))  # [u, x]
    basis = np.einsum("ux,vy->uvyx", c, c).reshape(sub_dim * sub_dim, res * res)
    return np.ascontiguousarray(basis.T, dtype=np.float32)


@functools.cache
def _geoda_class() -> type:
    from art.attacks.evasion import GeoDA

    class OneImageGeoDA(GeoDA):
        """ART's GeoDA on one image, ART's own steps with two changes: the basis comes from
        `_dct_basis` (ART builds it with np.mat and caches it as a .npy file in the working
        directory), and the two checks ART only logs are not made (each costs a query)."""

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kw: Any) -> np.ndarray:
            assert y is not None and len(x) == 1
            self.clip_min, self.clip_max = self.estimator.clip_values
            self.sub_basis = _dct_basis(self.sub_dim, x.shape[2])
            self.nb_calls = 0
            x_random = self._find_random_adversarial(x=x, y=y)
            boundary = self._binary_search(x, y, x_random, tol=self.bin_search_tol)
            grad = np.zeros_like(x)
            for k in range(self.iterate):
                grad = (
                    self._black_grad_batch(boundary, self.q_opt_iter[k], self.batch_size, y)[0]
                    + grad
                )
                towards = self._go_to_boundary(x, y, grad)
                boundary = self._binary_search(x, y, towards, tol=self.bin_search_tol)
            return np.clip(boundary, self.clip_min, self.clip_max)

    return OneImageGeoDA


def _make(name: str, estimator: Any, eps: float, budget: int, size: int) -> Any:
    """ART's attack for one image. The budget stops every attack (the oracle raises), so
    iteration limits are set so as not to stop it before."""
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SignOPTAttack, SimBA, SquareAttack

    if name == "square":
        return SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=budget, nb_restarts=1,
                            batch_size=1, verbose=False)  # fmt: skip
    if name == "simba":
        return SimBA(estimator, attack="px", max_iter=budget, epsilon=eps, batch_size=1,
                     verbose=False)  # fmt: skip
    if name == "hopskipjump":  # batch_size: one submit per evaluation, the batcher splits
        return HopSkipJump(estimator, targeted=False, norm=2, max_iter=budget, max_eval=1000,
                           init_eval=100, batch_size=1000, verbose=False)  # fmt: skip
    if name == "boundary":
        return BoundaryAttack(estimator, targeted=False, max_iter=budget, delta=0.01,
                              epsilon=0.01, batch_size=1000, verbose=False)  # fmt: skip
    if name == "geoda":  # ART's query schedule needs max_iter >= 300
        return _geoda_class()(estimator, batch_size=1000, norm=2, sub_dim=min(10, size),
                              max_iter=max(budget, 300), verbose=False)  # fmt: skip
    if name == "signopt":  # 10 starting directions and 50 per gradient (ART: 100, 200)
        return SignOPTAttack(estimator, targeted=False, num_trial=10, k=50, max_iter=budget,
                             query_limit=budget, batch_size=1, verbose=False)  # fmt: skip
    raise ConfigError(f"query attack must be one of {tuple(QUERY_ATTACKS)}, got {name!r}")


def _attack_image(
    info: AttackInfo,
    batcher: Batcher,
    x0: np.ndarray,
    label: int,
    num_classes: int,
    *,
    budget: int,
    eps: float,
    seed: int,
    quantize: bool,
    memo: bool,
) -> Trace:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    turn = ImageTurn(seed)

    def send(rows: np.ndarray) -> np.ndarray:  # other images run ART code while this waits
        return batcher.submit(rows, turn)

    oracle = Oracle(
        send, x0, label, budget, num_classes=num_classes, labels_only=info.threat == "decision",
        quantize=quantize, linf_eps=eps if info.uses_eps and info.norm == "linf" else None,
        memo=memo,
    )  # fmt: skip
    batcher.enter()
    try:
        with turn, contextlib.suppress(_BudgetSpent, QueryBudgetExceeded):
            estimator = BlackBoxClassifierNeuralNetwork(
                oracle, input_shape=x0.shape, nb_classes=num_classes, clip_values=(0.0, 1.0)
            )
            attack = _make(info.name, estimator, eps, budget, x0.shape[-1])
            y = np.eye(num_classes, dtype=np.float32)[[label]]
            attack.generate(x0[None].astype(np.float32), y=y)
    finally:
        batcher.leave()
    return oracle.trace


def attack_images(
    name: str,
    predict: Predict,
    x: np.ndarray,
    y: np.ndarray | Sequence[int],
    num_classes: int,
    *,
    budget: int,
    eps: float,
    seed: int | Sequence[int],
    threat: Threat = "score",
    quantize: bool = False,
    progress: Callable[[int, Trace], None] | None = None,
    max_batch: int = 64,
    workers: int = 64,
    window: float = 0.002,
    memo: bool = True,
) -> list[Trace]:
    """Attack every image of `x` (float32 [N, 3, H, W] in [0, 1], true labels `y`), each
    until success or `budget` queries, all at once; the traces in the order of `x`.

    predict: float32 [M, 3, H, W] -> [M, num_classes], called with at most `max_batch`
    rows (the endpoint's max batch size) from one thread at a time: scores for threat
    "score", one-hot labels (or scores, of which only the argmax is used) for "decision".
    seed: one per image, or a base to which the image's position is added; an image's trace
    depends on its own image, label and seed only (given the endpoint's answers).
    quantize: send candidates on uint8 levels (L-inf attacks: the levels inside the
    eps-ball) and judge what was sent, as the endpoint sees a UINT8 image.
    progress(position, trace) is called in this thread as each image finishes.
    workers: images attacked at the same time (one thread each); window: seconds the
    batcher waits for more rows once none arrive, before sending a partial call.
    """
    info = attack_info(name)
    if threat not in THREATS:
        raise ConfigError(f"threat must be one of {THREATS}, got {threat!r}")
    if threat == "decision" and info.threat == "score":
        raise ConfigError(
            f"{name} needs scores and the endpoint answers labels only; attacks that fit: "
            + ", ".join(attacks_for("decision"))
        )
    if isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget must be >= 1 query, got {budget!r}")
    x = np.asarray(x, dtype=np.float32)
    labels = [int(v) for v in np.asarray(y).reshape(-1)]
    if x.ndim != 4 or len(labels) != len(x):
        raise ConfigError(f"x must be [N, C, H, W] with one label each, got {x.shape}, "
                          f"{len(labels)} labels")  # fmt: skip
    seeds = [seed + i for i in range(len(x))] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != len(x):
        raise ConfigError(f"seed: one per image ({len(x)}) or one int, got {len(seeds)}")
    if not len(x):
        return []
    if name in ("hopskipjump", "boundary"):
        seed_random_starts()
    logging.getLogger("art").setLevel(logging.ERROR)
    batcher = Batcher(predict, max_batch=max_batch, window=window)
    traces: list[Trace | None] = [None] * len(x)
    error: BaseException | None = None
    try:
        with ThreadPoolExecutor(max(1, min(len(x), workers)), f"{name}-image") as pool:
            futures = {
                pool.submit(_attack_image, info, batcher, x[i], labels[i], num_classes,
                            budget=budget, eps=eps, seed=seeds[i], quantize=quantize,
                            memo=memo): i
                for i in range(len(x))
            }  # fmt: skip
            try:
                for future in as_completed(futures):
                    if (exc := future.exception()) is not None:
                        error = error or exc
                        batcher.abort(exc)  # the other images stop at their next query
                        continue
                    i = futures[future]
                    traces[i] = future.result()
                    if progress is not None:
                        progress(i, future.result())
            except BaseException as exc:  # Ctrl-C or a failing callback: stop every image
                batcher.abort(exc)
                raise
    finally:
        batcher.close()
    if error is not None:
        raise error
    return [t for t in traces if t is not None]


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
