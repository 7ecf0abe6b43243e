"""What an attack run found, as types: the harness returns them, the reports and the CLI
read their attributes, and results.json is their `to_dict()` (`from_dict` reads it back).

The JSON layout is the file format other tools read (flat transfer rows, `config` holding
the run's settings without the token), so `to_dict` keeps it stable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from defcnn import display
from defcnn.attack.blackbox import BudgetRow, Trace
from defcnn.attack.metrics import BoundaryFigure, PerturbationNorms, TransferMetrics
from defcnn.client import QueryCounter

if TYPE_CHECKING:
    from defcnn.attack.harness import QuerySettings, TransferSettings


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
    """The run's settings for results.json (the token file's path, never the token)."""
    cfg = asdict(settings)
    endpoint = cfg.pop("endpoint")
    cfg.update(url=endpoint["url"], models=list(endpoint["models"]), seed=settings.data.seed)
    return cfg


def _settings_fields(cls: type, cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings' own fields from a `config_dict` (tuples back from JSON lists)."""
    from defcnn.attack.harness import DataChoice, Endpoint

    names = {f.name for f in fields(cls)} - {"endpoint", "data"}
    out: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names
    }
    out["endpoint"] = Endpoint(url=cfg["url"], models=tuple(cfg["models"]))
    out["data"] = DataChoice(**cfg["data"])
    return out


@dataclass(frozen=True)
class TransferRow:
    """One (target, attack, eps): the paper's metrics (`TransferMetrics`) and the size of
    what was sent (`PerturbationNorms`), flat as in results.json."""

    target: str
    attack: str
    eps_255: float
    images: int
    transfer_subset: int
    transfer_accuracy: float
    accuracy_clean: float
    accuracy_adversarial: float
    source_fooled: float
    success_rate: float
    mean_linf: float
    mean_l2: float

    @classmethod
    def of(
        cls,
        target: str,
        attack: str,
        eps_255: float,
        metrics: TransferMetrics,
        norms: PerturbationNorms,
    ) -> TransferRow:
        return cls(target=target, attack=attack, eps_255=eps_255, **asdict(metrics),
                   **asdict(norms))  # fmt: skip

    def line(self) -> str:
        """The row for a console."""
        return (
            f"{self.target:<20} {self.attack:<7} eps {self.eps_255:>5g}/255  "
            f"acc clean {display.number(self.accuracy_clean)} "
            f"adv {display.number(self.accuracy_adversarial)}  "
            f"transfer metric {display.number(self.transfer_accuracy)}"
        )


@dataclass(frozen=True)
class TransferResult:
    settings: TransferSettings
    dataset: DatasetInfo
    rows: tuple[TransferRow, ...]
    queries: dict[str, QueryCounter]
    versions: dict[str, str]

    kind: ClassVar[str] = "transfer"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": config_dict(self.settings),
            "dataset": asdict(self.dataset),
            "rows": [asdict(r) for r in self.rows],
            "queries": {m: asdict(c) for m, c in self.queries.items()},
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferResult:
        from defcnn.attack.harness import TransferSettings

        return cls(
            settings=TransferSettings(**_settings_fields(TransferSettings, data["config"])),
            dataset=DatasetInfo.from_dict(data["dataset"]),
            rows=tuple(TransferRow(**r) for r in data["rows"]),
            queries=_counters(data["queries"]),
            versions=dict(data["versions"]),
        )


@dataclass(frozen=True)
class ModelQueryResult:
    """One endpoint model under a query attack."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attacked": self.attacked,
            "skipped": self.skipped,
            "by_budget": [asdict(r) for r in self.by_budget],
            "traces": {str(i): t.to_dict() for i, t in sorted(self.traces.items())},
            "boundary_figure": None if self.boundary_figure is None
            else asdict(self.boundary_figure),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelQueryResult:
        figure = data.get("boundary_figure")
        return cls(
            clean_accuracy=data["clean_accuracy"], attacked=data["attacked"],
            skipped=data["skipped"],
            by_budget=tuple(BudgetRow(**r) for r in data["by_budget"]),
            traces={int(i): Trace.from_dict(t) for i, t in data["traces"].items()},
            boundary_figure=None if figure is None else BoundaryFigure(**figure),
        )  # fmt: skip


@dataclass(frozen=True)
class QueryResult:
    settings: QuerySettings
    decision_based: bool
    dataset: DatasetInfo
    models: dict[str, ModelQueryResult]
    queries: dict[str, QueryCounter]
    versions: dict[str, str]

    kind: ClassVar[str] = "query"

    def line(self, model: str) -> str:
        """One model's numbers at the full budget, for a console."""
        last = self.models[model].last
        text = (
            f"{model:<20} {self.settings.attack} budget {last.budget}: success "
            f"{display.number(last.success_rate)} median queries "
            f"{display.queries(last.median_queries)}"
        )
        if self.decision_based:
            text += f" median L2 {display.distance(last.median_l2)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": config_dict(self.settings),
            "decision_based": self.decision_based,
            "dataset": asdict(self.dataset),
            "models": {m: r.to_dict() for m, r in self.models.items()},
            "queries": {m: asdict(c) for m, c in self.queries.items()},
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryResult:
        from defcnn.attack.harness import QuerySettings

        return cls(
            settings=QuerySettings(**_settings_fields(QuerySettings, data["config"])),
            decision_based=bool(data["decision_based"]),
            dataset=DatasetInfo.from_dict(data["dataset"]),
            models={m: ModelQueryResult.from_dict(r) for m, r in data["models"].items()},
            queries=_counters(data["queries"]),
            versions=dict(data["versions"]),
        )
