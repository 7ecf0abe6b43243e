"""The query-attack engine against a fixed linear classifier on 3x8x8 images (no server):
exact per-image budgets, shared predict calls, repeatable results whatever the threads do,
label-only endpoints, uint8 quantisation inside the eps-ball."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from defcnn.attack import blackbox
from defcnn.attack._querybatch import Batcher
from defcnn.attack.blackbox import (
    DECISION_BASED,
    QUERY_ATTACKS,
    Oracle,
    Trace,
    attack_images,
    attacks_for,
)
from defcnn.client.errors import QueryBudgetExceeded
from defcnn.errors import ConfigError

CLASSES = 10
SHAPE = (3, 8, 8)
EPS = 16 / 255
ALL = tuple(QUERY_ATTACKS)


class Linear:
    """A fixed linear classifier, row by row in float64 (a row's answer does not depend on
    the batch it came in), recording every call's rows."""

    def __init__(self, *, labels_only: bool = False, jitter: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        self.w = rng.normal(size=(CLASSES, int(np.prod(SHAPE)))) * 0.3
        self.labels_only = labels_only
        self.calls: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._jitter = random.Random(1) if jitter else None
        self._jitter_s = jitter

    def scores(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1) - 0.5
        return np.einsum("kd,nd->nk", self.w, flat)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(np.array(x, copy=True))
        if self._jitter is not None:  # shuffles how the image threads interleave
            time.sleep(self._jitter.random() * self._jitter_s)
        s = self.scores(x)
        if self.labels_only:
            return np.eye(CLASSES, dtype=np.float32)[s.argmax(1)]
        return s.astype(np.float32)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """Six images on uint8 levels and the model's labels for them (all 'correct')."""
    x = np.random.default_rng(3).integers(0, 256, size=(6, *SHAPE)).astype(np.float32) / 255
    return x, Linear().scores(x).argmax(1)


def _threat(name: str) -> str:
    return QUERY_ATTACKS[name].threat


def _run(name: str, model: Linear, x: np.ndarray, y: np.ndarray, **kw) -> list[Trace]:
    kw = {"budget": 60, "eps": EPS, "seed": 5, "threat": _threat(name), **kw}
    return attack_images(name, model, x, y, CLASSES, **kw)


def _same(a: list[Trace], b: list[Trace]) -> bool:
    for s, t in zip(a, b, strict=True):
        if s.to_dict() != t.to_dict():
            return False
        if s.best_adv is None or t.best_adv is None:
            if (s.best_adv is None) != (t.best_adv is None):
                return False
        elif not np.array_equal(s.best_adv, t.best_adv):
            return False
    return True


def test_declarations_and_threats() -> None:
    assert set(ALL) == {"square", "simba", "hopskipjump", "boundary", "geoda", "signopt"}
    assert attacks_for("decision") == DECISION_BASED == ("hopskipjump", "boundary", "geoda",
                                                         "signopt")  # fmt: skip
    assert attacks_for("score") == ALL  # a score endpoint answers labels too
    for a in QUERY_ATTACKS.values():
        assert a.uses_eps == (a.threat == "score") and a.norm == ("linf" if a.uses_eps else "l2")
    with pytest.raises(ConfigError, match="threat must be one of"):
        attacks_for("unknown")


def test_a_score_attack_is_refused_on_labels_naming_what_fits(images) -> None:
    x, y = images
    with pytest.raises(ConfigError, match="hopskipjump, boundary, geoda, signopt"):
        attack_images("square", Linear(labels_only=True), x, y, CLASSES, budget=10, eps=EPS,
                      seed=0, threat="decision")  # fmt: skip
    with pytest.raises(ConfigError, match="query attack must be one of"):
        attack_images("nope", Linear(), x, y, CLASSES, budget=10, eps=EPS, seed=0)


@pytest.mark.parametrize("name", ALL)
def test_budget_is_exact_per_image_and_calls_are_shared(name: str, images) -> None:
    x, y = images
    model = Linear(labels_only=_threat(name) == "decision")
    traces = _run(name, model, x, y, max_batch=7)
    assert len(traces) == len(x)
    assert all(0 < t.queries <= 60 for t in traces)
    assert sum(t.queries for t in traces) == sum(model.sizes)  # every row sent is counted
    assert max(model.sizes) <= 7
    assert np.mean(model.sizes) > 1  # the images' candidates went out together
    for t in traces:
        if t.first_success is not None:
            assert t.first_success <= t.queries
            assert t.best_adv is not None and t.best_label is not None
            assert int(Linear().scores(t.best_adv[None]).argmax()) == t.best_label
    if name in DECISION_BASED:  # they keep shrinking the distance until the budget is spent
        assert all(t.queries == 60 for t in traces)
        assert all(t.first_success is not None for t in traces)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_traces_whatever_the_threads_do(name: str, images) -> None:
    x, y = images
    labels_only = _threat(name) == "decision"
    first = _run(name, Linear(labels_only=labels_only), x, y, max_batch=64)
    again = _run(name, Linear(labels_only=labels_only, jitter=0.002), x, y, max_batch=3,
                 workers=4, window=0.0)  # fmt: skip
    one_by_one = _run(name, Linear(labels_only=labels_only), x, y, workers=1)
    assert _same(first, again) and _same(first, one_by_one)
    alone = _run(name, Linear(labels_only=labels_only), x[2:3], y[2:3], seed=[5 + 2])
    assert _same(first[2:3], alone)  # an image's attack does not depend on its company
    other = _run(name, Linear(labels_only=labels_only), x, y, seed=6)
    assert not _same(first, other)  # and the seed matters


@pytest.mark.parametrize("name", DECISION_BASED)
def test_decision_attacks_work_on_labels_only(name: str, images) -> None:
    x, y = images
    traces = _run(name, Linear(labels_only=True), x, y, budget=80)
    for t, label in zip(traces, y, strict=True):
        assert t.first_success is not None and t.best_label != label
        assert t.improvements == sorted(t.improvements, key=lambda p: -p[1])  # L2 decreasing


@pytest.mark.parametrize("name", ["square", "simba", "hopskipjump", "signopt"])
def test_quantize_sends_uint8_levels_inside_the_ball(name: str, images) -> None:
    x, y = images
    eps = 4 / 255
    model = Linear(labels_only=_threat(name) == "decision")
    traces = _run(name, model, x, y, eps=eps, quantize=True)
    sent = np.concatenate(model.calls)
    assert np.abs(sent * 255 - np.rint(sent * 255)).max() < 1e-3
    if QUERY_ATTACKS[name].uses_eps:  # each sent image lies in the ball of one original
        dist = np.abs(sent[:, None] - x[None]).reshape(len(sent), len(x), -1).max(axis=2)
        assert dist.min(axis=1).max() <= eps + 1e-6
    for t in traces:  # judged on what was sent
        if t.best_adv is not None:
            assert np.abs(t.best_adv * 255 - np.rint(t.best_adv * 255)).max() < 1e-3


def test_a_successful_attack_records_its_first_success(images) -> None:
    x, y = images
    traces = _run("square", Linear(), x, y, budget=200)
    won = [t for t in traces if t.first_success is not None]
    assert won
    for t in won:
        assert t.first_success is not None and 1 <= t.first_success <= t.queries
        assert t.improvements[0][0] == t.first_success


def test_repeats_are_answered_from_memory() -> None:
    sent: list[int] = []

    def send(rows: np.ndarray) -> np.ndarray:
        sent.append(len(rows))
        return Linear().scores(rows).astype(np.float32)

    x0 = np.full(SHAPE, 0.5, dtype=np.float32)
    oracle = Oracle(send, x0, 0, 3, num_classes=CLASSES)
    batch = np.stack([x0, x0, x0 + 0.1])
    first = oracle(batch)
    assert oracle.trace.queries == 2 and sent == [2]  # x0 once, and the other
    assert np.array_equal(oracle(batch[:1]), first[:1]) and oracle.trace.queries == 2
    with pytest.raises(blackbox._BudgetSpent):  # one query left, two new rows
        oracle(np.stack([x0 + 0.2, x0 + 0.3]))
    assert oracle.trace.queries == 3


def test_the_client_budget_ends_the_attacks_and_other_errors_propagate(images) -> None:
    x, y = images
    model = Linear()
    calls = 0

    def budgeted(b: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise QueryBudgetExceeded("client budget spent")
        return model(b)

    traces = attack_images("square", budgeted, x, y, CLASSES, budget=60, eps=EPS, seed=0)
    assert sum(t.queries for t in traces) == sum(model.sizes)

    def broken(b: np.ndarray) -> np.ndarray:
        raise RuntimeError("endpoint down")

    with pytest.raises(RuntimeError, match="endpoint down"):
        attack_images("hopskipjump", broken, x, y, CLASSES, budget=60, eps=EPS, seed=0)


def test_progress_gets_each_image_once(images) -> None:
    x, y = images
    seen: dict[int, Trace] = {}
    traces = _run("simba", Linear(), x, y, progress=lambda i, t: seen.setdefault(i, t))
    assert sorted(seen) == list(range(len(x)))
    assert all(seen[i] is traces[i] for i in seen)


def test_batcher_splits_big_requests_and_keeps_order() -> None:
    sizes: list[int] = []

    def echo(b: np.ndarray) -> np.ndarray:
        sizes.append(len(b))
        return b[:, :1] * 2

    batcher = Batcher(echo, max_batch=4, window=0.001)
    rows = [np.arange(n, dtype=np.float32)[:, None] + 100 * k for k, n in enumerate((9, 1, 5))]
    out: list[np.ndarray | None] = [None] * 3

    def worker(k: int) -> None:
        batcher.enter()
        try:
            out[k] = batcher.submit(rows[k])
        finally:
            batcher.leave()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for k in range(3):
        answer = out[k]
        assert answer is not None and np.array_equal(answer, rows[k] * 2)
    assert max(sizes) <= 4 and sum(sizes) == 15


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, in ART
def test_geoda_basis_is_arts(monkeypatch) -> None:
    from art.attacks.evasion import GeoDA

    monkeypatch.setattr(np, "mat", np.asmatrix, raising=False)  # ART's builder predates NumPy 2
    theirs = np.asarray(GeoDA._generate_2d_dct_basis(sub_dim=4, res=6))
    assert np.allclose(blackbox._dct_basis(4, 6), theirs, atol=1e-6)
