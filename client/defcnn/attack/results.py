"""What an attack run found, as types: the harness returns them, the reports and the CLI
read their attributes, and results.json is their `to_dict()` (`from_dict` reads it back).

The JSON layout is the file format other tools read (flat transfer rows, `config` holding
the run's settings without the token), so `to_dict` keeps it stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from defcnn import display
from defcnn.attack._runstate import Totals
from defcnn.attack.blackbox import BudgetRow, Trace
from defcnn.attack.metrics import BoundaryFigure, PerturbationNorms, TransferMetrics
from defcnn.attack.settings import QuerySettings, TransferSettings
from defcnn.attack.settings import from_dict as settings_from_dict
from defcnn.attack.settings import to_dict as settings_dict
from defcnn.client import QueryCounter
from defcnn.client.spec import EndpointSpec
from defcnn.stats import wilson


@dataclass(frozen=True)
class DatasetInfo:
    """The seeded test subset that was attacked."""

    name: str
    source: str
    images: int
    indices: tuple[int, ...]
    classes: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        return cls(
            name=data["name"], source=data["source"], images=int(data["images"]),
            indices=tuple(data["indices"]), classes=tuple(data["classes"]),
        )  # fmt: skip


def queries_text(queries: dict[str, QueryCounter]) -> str:
    """What each model was sent, for people: "digits 61 images in 3 requests"."""
    if not queries:
        return "none"
    return "; ".join(f"{m} {c.images} images in {c.rpcs} requests" for m, c in queries.items())


def _counters(data: dict[str, Any]) -> dict[str, QueryCounter]:
    return {m: QueryCounter(**c) for m, c in data.items()}


def config_dict(settings: TransferSettings | QuerySettings) -> dict[str, Any]:
    """The run's settings for results.json (the token file's path, never the token), with
    the endpoint's url and models and the seed also at the top for readers."""
    cfg = settings_dict(settings)
    cfg.update(url=settings.endpoint.url, models=list(settings.endpoint.models),
               seed=settings.data.seed)  # fmt: skip
    return cfg


Interval = tuple[float, float]


def interval(successes: float, trials: int) -> Interval | None:
    """The 95% Wilson interval of a rate (None: no trials, so no rate)."""
    if trials < 1:
        return None
    rate = wilson(round(successes), trials)
    return (rate.low, rate.high)


def rate_text(value: float | None, ci: Interval | Sequence[float] | None) -> str:
    """A rate with its interval for people: `0.820 [0.733, 0.883]` (`-` when there is none)."""
    text = display.number(value)
    if ci is None or value is None or value != value:  # NaN: an empty subset
        return text
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _ci(value: Any) -> Interval | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _specs_dict(specs: dict[str, EndpointSpec]) -> dict[str, Any]:
    return {m: s.to_dict() for m, s in specs.items()}


def _specs(data: dict[str, Any]) -> dict[str, EndpointSpec]:
    return {m: EndpointSpec.from_dict(s) for m, s in data.get("specs", {}).items()}


def totals_text(totals: Totals) -> str:
    runs = "1 run" if totals.runs == 1 else f"{totals.runs} runs"
    return f"{runs}, {totals.wall_s:.1f} s: {queries_text(totals.queries)}"


@dataclass(frozen=True)
class TransferRow:
    """One (target, attack, eps): the paper's metrics (`TransferMetrics`), the size of what
    was sent (`PerturbationNorms`) and the 95% Wilson interval of each headline rate, flat
    as in results.json. `eps_255` is None for CW-L2 (an L2 attack, no eps)."""

    target: str
    attack: str
    eps_255: float | None
    images: int
    transfer_subset: int
    transfer_accuracy: float
    accuracy_clean: float
    accuracy_adversarial: float
    source_fooled: float
    success_rate: float
    mean_linf: float
    mean_l2: float
    transfer_accuracy_ci: Interval | None = None
    accuracy_adversarial_ci: Interval | None = None
    success_rate_ci: Interval | None = None

    @classmethod
    def of(
        cls,
        target: str,
        attack: str,
        eps_255: float | None,
        metrics: TransferMetrics,
        norms: PerturbationNorms,
    ) -> TransferRow:
        m = metrics
        clean_right = round(m.accuracy_clean * m.images) if m.images else 0
        return cls(
            target=target, attack=attack, eps_255=eps_255, **asdict(m), **asdict(norms),
            transfer_accuracy_ci=interval(m.transfer_accuracy * m.transfer_subset,
                                          m.transfer_subset),
            accuracy_adversarial_ci=interval(m.accuracy_adversarial * m.images, m.images),
            success_rate_ci=interval(m.success_rate * clean_right, clean_right),
        )  # fmt: skip

    @property
    def eps_text(self) -> str:
        return "L2" if self.eps_255 is None else f"{self.eps_255:g}/255"

    def line(self) -> str:
        """The row for a console."""
        return (
            f"{self.target:<20} {self.attack:<7} eps {self.eps_text:>9}  "
            f"acc clean {display.number(self.accuracy_clean)} "
            f"adv {rate_text(self.accuracy_adversarial, self.accuracy_adversarial_ci)}  "
            f"success {rate_text(self.success_rate, self.success_rate_ci)}  "
            f"transfer metric {rate_text(self.transfer_accuracy, self.transfer_accuracy_ci)}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferRow:
        names = {f.name for f in fields(cls)}
        row = {k: v for k, v in data.items() if k in names}
        for k in ("transfer_accuracy_ci", "accuracy_adversarial_ci", "success_rate_ci"):
            row[k] = _ci(row.get(k))
        return cls(**row)


@dataclass(frozen=True)
class TransferResult:
    """`queries` is this run's; `totals` adds up every run into the folder (resumes)."""

    settings: TransferSettings
    dataset: DatasetInfo
    rows: tuple[TransferRow, ...]
    queries: dict[str, QueryCounter]
    versions: dict[str, str]
    specs: dict[str, EndpointSpec] = field(default_factory=dict)
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)

    kind: ClassVar[str] = "transfer"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": config_dict(self.settings),
            "specs": _specs_dict(self.specs),
            "attack_params": {a: dict(p) for a, p in self.attack_params.items()},
            "dataset": asdict(self.dataset),
            "rows": [asdict(r) for r in self.rows],
            "queries": {m: asdict(c) for m, c in self.queries.items()},
            "totals": self.totals.to_dict(),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferResult:
        settings = settings_from_dict("transfer", data["config"])
        assert isinstance(settings, TransferSettings)
        return cls(
            settings=settings,
            dataset=DatasetInfo.from_dict(data["dataset"]),
            rows=tuple(TransferRow.from_dict(r) for r in data["rows"]),
            queries=_counters(data["queries"]),
            versions=dict(data["versions"]),
            specs=_specs(data),
            attack_params={a: dict(p) for a, p in data.get("attack_params", {}).items()},
            totals=Totals.from_dict(data.get("totals", {})),
        )


@dataclass(frozen=True)
class ModelQueryResult:
    """One endpoint model under a query attack. The rates' intervals are derived from the
    counts (`attacked` images right when clean, `skipped` wrong when clean)."""

    clean_accuracy: float
    attacked: int
    skipped: int
    by_budget: tuple[BudgetRow, ...]
    traces: dict[int, Trace]
    boundary_figure: BoundaryFigure | None = None

    @property
    def last(self) -> BudgetRow:
        """The numbers at the run's full budget."""
        return self.by_budget[-1]

    @property
    def images(self) -> int:
        return self.attacked + self.skipped

    @property
    def clean_accuracy_ci(self) -> Interval | None:
        return interval(self.attacked, self.images)

    @staticmethod
    def success_ci(row: BudgetRow) -> Interval | None:
        return interval(row.success_rate * row.images, row.images)

    @property
    def accuracy_under_attack(self) -> float | None:
        """Of all images, those right when clean and not fooled within the full budget."""
        if not self.images:
            return None
        fooled = round(self.last.success_rate * self.last.images) if self.last.images else 0
        return (self.attacked - fooled) / self.images

    @property
    def accuracy_under_attack_ci(self) -> Interval | None:
        value = self.accuracy_under_attack
        return None if value is None else interval(value * self.images, self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "clean_accuracy_ci": self.clean_accuracy_ci,
            "accuracy_under_attack": self.accuracy_under_attack,
            "accuracy_under_attack_ci": self.accuracy_under_attack_ci,
            "attacked": self.attacked,
            "skipped": self.skipped,
            "by_budget": [asdict(r) | {"success_rate_ci": self.success_ci(r)}
                          for r in self.by_budget],
            "traces": {str(i): t.to_dict() for i, t in sorted(self.traces.items())},
            "boundary_figure": None if self.boundary_figure is None
            else asdict(self.boundary_figure),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelQueryResult:
        figure = data.get("boundary_figure")
        names = {f.name for f in fields(BudgetRow)}
        return cls(
            clean_accuracy=data["clean_accuracy"], attacked=data["attacked"],
            skipped=data["skipped"],
            by_budget=tuple(BudgetRow(**{k: v for k, v in r.items() if k in names})
                            for r in data["by_budget"]),
            traces={int(i): Trace.from_dict(t) for i, t in data["traces"].items()},
            boundary_figure=None if figure is None else BoundaryFigure(**figure | {
                "mean_ci": _ci(figure.get("mean_ci")), "median_ci": _ci(figure.get("median_ci"))
            }),
        )  # fmt: skip


@dataclass(frozen=True)
class QueryResult:
    """`queries` is this run's; `totals` adds up every run into the folder (resumes)."""

    settings: QuerySettings
    decision_based: bool
    dataset: DatasetInfo
    models: dict[str, ModelQueryResult]
    queries: dict[str, QueryCounter]
    versions: dict[str, str]
    specs: dict[str, EndpointSpec] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)

    kind: ClassVar[str] = "query"

    def line(self, model: str) -> str:
        """One model's numbers at the full budget, for a console."""
        entry = self.models[model]
        last = entry.last
        text = (
            f"{model:<20} {self.settings.attack} budget {last.budget}: success "
            f"{rate_text(last.success_rate, entry.success_ci(last))} accuracy under attack "
            f"{rate_text(entry.accuracy_under_attack, entry.accuracy_under_attack_ci)} "
            f"median queries {display.queries(last.median_queries)}"
        )
        if self.decision_based:
            text += f" median L2 {display.distance(last.median_l2)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": config_dict(self.settings),
            "specs": _specs_dict(self.specs),
            "decision_based": self.decision_based,
            "dataset": asdict(self.dataset),
            "models": {m: r.to_dict() for m, r in self.models.items()},
            "queries": {m: asdict(c) for m, c in self.queries.items()},
            "totals": self.totals.to_dict(),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryResult:
        settings = settings_from_dict("query", data["config"])
        assert isinstance(settings, QuerySettings)
        return cls(
            settings=settings,
            decision_based=bool(data["decision_based"]),
            dataset=DatasetInfo.from_dict(data["dataset"]),
            models={m: ModelQueryResult.from_dict(r) for m, r in data["models"].items()},
            queries=_counters(data["queries"]),
            versions=dict(data["versions"]),
            specs=_specs(data),
            totals=Totals.from_dict(data.get("totals", {})),
        )
