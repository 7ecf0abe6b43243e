"""The demo's side-by-side comparison: one table (console and summary.md) and one plot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from defcnn import display
from defcnn.atomic import atomic_write

if TYPE_CHECKING:
    from defcnn.attack.results import QueryResult, TransferResult
    from defcnn.demo.pipeline import DemoSettings

MODELS = ("standard", "defective")
Better = Literal["higher", "lower"]
ShownAs = Literal["number", "queries", "distance"]

_SHOW: dict[str, Callable[[float | None], str]] = {
    "number": display.number, "queries": display.queries, "distance": display.distance,
}  # fmt: skip


@dataclass(frozen=True)
class SummaryRow:
    """One measure in one setting, for both targets (None: nothing to measure)."""

    setting: str
    measure: str
    standard: float | None
    defective: float | None
    better: Better
    shown_as: ShownAs = "number"

    def cell(self, model: str) -> str:
        value = self.standard if model == "standard" else self.defective
        return _SHOW[self.shown_as](value)


@dataclass(frozen=True)
class Tally:
    """Transfer settings in which each target kept the higher accuracy."""

    defective: int = 0
    standard: int = 0
    tie: int = 0


@dataclass(frozen=True)
class DemoSummary:
    rows: tuple[SummaryRow, ...]
    transfer_tally: Tally
    surrogates: tuple[str, ...]
    transfer_images: int
    query_images: int
    dataset: str
    queries: dict[str, int]  # images sent to each endpoint model, both attacks together

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(
    setting: str, measure: str, values: Mapping[str, float | None], better: Better,
    shown_as: ShownAs = "number",
) -> SummaryRow:  # fmt: skip
    return SummaryRow(setting, measure, values["standard"], values["defective"], better, shown_as)


def summarize(
    s: DemoSettings,
    train_metrics: dict[str, dict[str, Any]],
    transfer: TransferResult,
    query: QueryResult,
    times: dict[str, float],
) -> DemoSummary:
    """Rows of (setting, measure, standard, defective), and a tally of who resisted more."""
    rows = [
        _row("clean", "test accuracy (whole test split)",
             {m: train_metrics[m]["test_accuracy"] for m in MODELS}, "higher"),
    ]  # fmt: skip
    by_key = {(r.target, r.attack, r.eps_255): r for r in transfer.rows}
    wins = {"defective": 0, "standard": 0, "tie": 0}
    for attack in s.attacks:
        for eps in s.eps_255:
            cells = {m: by_key[(m, attack, eps)] for m in MODELS}
            setting = f"transfer {attack.upper()} {eps:g}/255"
            acc = {m: c.accuracy_adversarial for m, c in cells.items()}
            rows.append(_row(setting, "accuracy under attack", acc, "higher"))
            metric = {m: c.transfer_accuracy for m, c in cells.items()}
            rows.append(_row(setting, "paper's transfer metric", metric, "higher"))
            if acc["defective"] > acc["standard"]:
                wins["defective"] += 1
            elif acc["defective"] < acc["standard"]:
                wins["standard"] += 1
            else:
                wins["tie"] += 1
    last = {m: query.models[m].last for m in MODELS}
    setting = f"query {s.query_attack} ({s.query_budget} queries/image)"
    rows.append(_row(setting, "success rate", {m: v.success_rate for m, v in last.items()},
                     "lower"))  # fmt: skip
    rows.append(_row(setting, "median queries to succeed",
                     {m: v.median_queries for m, v in last.items()}, "higher",
                     "queries"))  # fmt: skip
    if query.decision_based:
        rows.append(_row(setting, "median L2 of the closest adversarial",
                         {m: v.median_l2 for m, v in last.items()}, "higher",
                         "distance"))  # fmt: skip
    return DemoSummary(
        rows=tuple(rows),
        transfer_tally=Tally(**wins),
        surrogates=transfer.settings.surrogates,
        transfer_images=transfer.dataset.images,
        query_images=query.dataset.images,
        dataset=transfer.dataset.source,
        queries={m: transfer.queries[m].images + query.queries[m].images for m in MODELS},
    )


def table(summary: DemoSummary) -> str:
    """The comparison as a Markdown table (also readable on a terminal)."""
    lines = ["| setting | measure | standard | defective | better |", "|---|---|---|---|---|"]
    for r in summary.rows:
        lines.append(f"| {r.setting} | {r.measure} | {r.cell('standard')} | "
                     f"{r.cell('defective')} | {r.better} |")  # fmt: skip
    return "\n".join(lines)


def verdict(summary: DemoSummary) -> str:
    t = summary.transfer_tally
    n = t.defective + t.standard + t.tie
    return (f"Transfer attacks: the defective model kept higher accuracy in {t.defective} of "
            f"{n} settings, the standard one in {t.standard}, {t.tie} tied.")  # fmt: skip


def _plot(path: Path, summary: DemoSummary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary.rows if r.measure == "accuracy under attack"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    for k, (m, color) in enumerate(zip(MODELS, ("tab:gray", "tab:blue"), strict=True)):
        values = [(r.standard if m == "standard" else r.defective) or 0.0 for r in rows]
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], values, width=0.38, label=m,
               color=color)  # fmt: skip
    ax.set_xticks(list(xs), [r.setting.removeprefix("transfer ") for r in rows],
                  rotation=45, ha="right")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy under transfer attack")
    ax.set_title(f"{summary.transfer_images} test images, surrogate crafted locally")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_summary(out: Path, summary: DemoSummary) -> None:
    """summary.md and summary.png in the run folder; the table and verdict on the console."""
    text = "\n".join([
        "# defcnn demo: standard vs defective, attacked through the served endpoints",
        "",
        f"Data: {summary.dataset}. Transfer attacks on {summary.transfer_images} test "
        f"images from {', '.join(summary.surrogates)}; query attack on "
        f"{summary.query_images} images. Images sent to the endpoint: "
        + ", ".join(f"{m} {q}" for m, q in summary.queries.items()) + ".",
        "",
        table(summary),
        "",
        verdict(summary),
        "",
        "![accuracy under transfer attack](summary.png)",
        "",
        "Details: transfer/report.md and query/report.md.",
        "",
    ])  # fmt: skip
    _plot(out / "summary.png", summary)
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(text))
    print(table(summary))
    print(verdict(summary))
    print(f"report: {out / 'summary.md'}")
