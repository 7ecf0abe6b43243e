"""The demo's side-by-side comparison: one table (console and summary.md), one plot, and a
verdict in which a difference inside its 95% interval is a tie, not a win."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from defcnn import display
from defcnn.atomic import atomic_write
from defcnn.stats import Estimate, Rate, bootstrap, difference, rate_of

if TYPE_CHECKING:
    from defcnn.attack.results import ModelQueryResult, QueryResult, TransferResult
    from defcnn.demo.pipeline import DemoSettings

MODELS = ("standard", "defective")
# Clean accuracies this close count as comparable (the "within 2 points").
MATCH_TOLERANCE = 0.02
Better = Literal["higher", "lower"]
ShownAs = Literal["number", "queries", "distance"]
Outcome = Literal["defective", "standard", "tie"]
Interval = tuple[float, float]

_SHOW: dict[str, Callable[[float | None], str]] = {
    "number": display.number, "queries": display.queries, "distance": display.distance,
}  # fmt: skip


@dataclass(frozen=True)
class SummaryRow:
    """One measure in one setting for both targets (None: nothing to measure), with each
    value's 95% interval and the difference defective - standard with its interval."""

    setting: str
    measure: str
    standard: float | None
    defective: float | None
    better: Better
    shown_as: ShownAs = "number"
    standard_ci: Interval | None = None
    defective_ci: Interval | None = None
    difference: float | None = None
    difference_ci: Interval | None = None

    def cell(self, model: str) -> str:
        value = self.standard if model == "standard" else self.defective
        ci = self.standard_ci if model == "standard" else self.defective_ci
        show = _SHOW[self.shown_as]
        return show(value) if ci is None else f"{show(value)} [{show(ci[0])}, {show(ci[1])}]"

    @property
    def outcome(self) -> Outcome | None:
        """Which target this row favours; a tie when the interval holds zero (None: no
        interval was computed for this measure)."""
        if self.difference_ci is None:
            return None
        low, high = self.difference_ci
        if low <= 0 <= high:
            return "tie"
        defective_larger = low > 0
        return "defective" if defective_larger == (self.better == "higher") else "standard"

    def difference_cell(self) -> str:
        if self.difference is None or self.difference_ci is None:
            return display.MISSING
        low, high = self.difference_ci
        return f"{self.difference:+.3f} [{low:+.3f}, {high:+.3f}]"


@dataclass(frozen=True)
class Tally:
    """Transfer settings in which each target kept the higher accuracy beyond the interval."""

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
    matched: bool  # clean accuracies within MATCH_TOLERANCE
    standard_stopped_at_epoch: float | None = None  # None: trained for every epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(value: float | None, trials: int) -> Rate | None:
    if value is None or value != value or trials < 1:
        return None
    return rate_of(value, trials)


def _rate_row(
    setting: str, measure: str, rates: Mapping[str, Rate | None], better: Better
) -> SummaryRow:
    std, dfc = rates["standard"], rates["defective"]
    diff = difference(dfc, std) if std is not None and dfc is not None else None
    return SummaryRow(
        setting, measure,
        standard=None if std is None else std.value,
        defective=None if dfc is None else dfc.value,
        better=better,
        standard_ci=None if std is None else (std.low, std.high),
        defective_ci=None if dfc is None else (dfc.low, dfc.high),
        difference=None if diff is None else diff.value,
        difference_ci=None if diff is None else (diff.low, diff.high),
    )  # fmt: skip


def _median_queries(entry: ModelQueryResult, budget: int) -> Estimate | None:
    """Median queries to the first success over the images fooled within the budget, with
    its bootstrap interval (None: none was fooled)."""
    firsts = [t.first_success for t in entry.traces.values()
              if t.first_success is not None and t.first_success <= budget]  # fmt: skip
    return bootstrap(firsts, "median", seed=0) if firsts else None


def _clean_rate(metrics: dict[str, Any]) -> Rate | None:
    history = metrics.get("history") or [{}]
    return _rate(metrics.get("test_accuracy"), int(history[-1].get("test_count", 0)))


def summarize(
    s: DemoSettings,
    train_metrics: dict[str, dict[str, Any]],
    transfer: TransferResult,
    query: QueryResult,
) -> DemoSummary:
    """The rows, and a tally of the transfer settings in which each target resisted more."""
    clean = _rate_row("clean", "test accuracy (whole test split)",
                      {m: _clean_rate(train_metrics[m]) for m in MODELS}, "higher")  # fmt: skip
    rows = [clean]
    by_key = {(r.target, r.attack, r.eps_255): r for r in transfer.rows}
    wins = {"defective": 0, "standard": 0, "tie": 0}
    for attack in s.attacks:
        for eps in s.eps_255:
            cells = {m: by_key[(m, attack, eps)] for m in MODELS}
            setting = f"transfer {attack.upper()} {eps:g}/255"
            under = _rate_row(setting, "accuracy under attack",
                              {m: _rate(c.accuracy_adversarial, c.images)
                               for m, c in cells.items()}, "higher")  # fmt: skip
            rows.append(under)
            rows.append(_rate_row(setting, "paper's transfer metric",
                                  {m: _rate(c.transfer_accuracy, c.transfer_subset)
                                   for m, c in cells.items()}, "higher"))  # fmt: skip
            wins[under.outcome or "tie"] += 1
    setting = f"query {s.query_attack} ({s.query_budget} queries/image)"
    models = {m: query.models[m] for m in MODELS}
    rows.append(_rate_row(setting, "success rate",
                          {m: _rate(e.last.success_rate, e.last.images)
                           for m, e in models.items()}, "lower"))  # fmt: skip
    std_q, def_q = (_median_queries(models[m], s.query_budget) for m in MODELS)
    rows.append(SummaryRow(
        setting, "median queries to succeed",
        standard=None if std_q is None else std_q.value,
        defective=None if def_q is None else def_q.value, better="higher", shown_as="queries",
        standard_ci=None if std_q is None else (std_q.low, std_q.high),
        defective_ci=None if def_q is None else (def_q.low, def_q.high),
    ))  # fmt: skip
    if query.decision_based:
        rows.append(SummaryRow(setting, "median L2 of the closest adversarial",
                               models["standard"].last.median_l2,
                               models["defective"].last.median_l2, "higher",
                               "distance"))  # fmt: skip
    gap = None if clean.difference is None else abs(clean.difference)
    return DemoSummary(
        rows=tuple(rows),
        transfer_tally=Tally(**wins),
        surrogates=transfer.settings.surrogates,
        transfer_images=transfer.dataset.images,
        query_images=query.dataset.images,
        dataset=transfer.dataset.source,
        queries={m: transfer.queries[m].images + query.queries[m].images for m in MODELS},
        matched=gap is not None and gap <= MATCH_TOLERANCE,
        standard_stopped_at_epoch=train_metrics["standard"].get("stopped_at_epoch"),
    )


def table(summary: DemoSummary) -> str:
    """The comparison as a Markdown table (also readable on a terminal)."""
    lines = [
        "| setting | measure | standard [95% CI] | defective [95% CI] | "
        "defective - standard [95% CI] | better | favours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary.rows:
        lines.append(f"| {r.setting} | {r.measure} | {r.cell('standard')} | "
                     f"{r.cell('defective')} | {r.difference_cell()} | {r.better} | "
                     f"{r.outcome or display.MISSING} |")  # fmt: skip
    return "\n".join(lines)


def _row(summary: DemoSummary, measure: str) -> SummaryRow | None:
    return next((r for r in summary.rows if r.measure == measure), None)


def verdict(summary: DemoSummary) -> str:
    """What the table shows, in three sentences; a difference inside its 95% interval is
    called a tie."""
    clean = summary.rows[0]
    stopped = summary.standard_stopped_at_epoch
    how = ("the standard target was stopped at the defective one's accuracy, after "
           f"{stopped:.2f} epochs; " if stopped is not None else "")  # fmt: skip
    comparable = (f"comparable (within {MATCH_TOLERANCE:.2f})" if summary.matched
                  else f"NOT comparable (more than {MATCH_TOLERANCE:.2f} apart), so "
                  "robustness differences may come from accuracy, not from the masks")  # fmt: skip
    t = summary.transfer_tally
    n = t.defective + t.standard + t.tie
    lines = [
        f"Clean accuracy: standard {clean.cell('standard')}, defective "
        f"{clean.cell('defective')}; {how}{comparable}.",
        f"Transfer attacks (accuracy under attack, 95% intervals): the defective model was "
        f"more robust in {t.defective} of {n} settings, the standard one in {t.standard}, "
        f"and {t.tie} were ties (the difference's interval holds zero).",
    ]
    success = _row(summary, "success rate")
    if success is not None:
        outcome = success.outcome
        said = {"defective": "the defective model resisted more",
                "standard": "the standard model resisted more",
                "tie": "a tie", None: "no comparison (no image was attacked)"}[outcome]  # fmt: skip
        lines.append(f"Query attack, {success.setting.removeprefix('query ')}: success rate "
                     f"standard {success.cell('standard')}, defective "
                     f"{success.cell('defective')}: {said}.")  # fmt: skip
    return "\n".join(lines)


def _plot(path: Path, summary: DemoSummary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary.rows if r.measure == "accuracy under attack"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    for k, (m, color) in enumerate(zip(MODELS, ("tab:gray", "tab:blue"), strict=True)):
        values = [(r.standard if m == "standard" else r.defective) or 0.0 for r in rows]
        cis = [r.standard_ci if m == "standard" else r.defective_ci for r in rows]
        errors = [[v - (c[0] if c else v) for v, c in zip(values, cis, strict=True)],
                  [(c[1] if c else v) - v for v, c in zip(values, cis, strict=True)]]  # fmt: skip
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], values, width=0.38, label=m,
               color=color, yerr=errors, capsize=2)  # fmt: skip
    ax.set_xticks(list(xs), [r.setting.removeprefix("transfer ") for r in rows],
                  rotation=45, ha="right")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy under transfer attack")
    ax.set_title(f"{summary.transfer_images} test images, surrogate crafted locally "
                 "(bars: 95% Wilson intervals)")  # fmt: skip
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
        + ", ".join(f"{m} {q}" for m, q in summary.queries.items()) + ". "
        "Intervals: 95% Wilson for each rate, Newcombe's hybrid score for differences "
        "(computed as for independent samples; both targets see the same images, so it is "
        "conservative).",
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
