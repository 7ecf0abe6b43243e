"""The demo's side-by-side comparison: one table (console and summary.md) and one plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defcnn.atomic import atomic_write

if TYPE_CHECKING:
    from defcnn.demo.pipeline import DemoSettings

MODELS = ("standard", "defective")


def _row(setting: str, measure: str, values: dict[str, Any], better: str) -> dict[str, Any]:
    return {"setting": setting, "measure": measure, "better": better,
            **{m: values.get(m) for m in MODELS}}  # fmt: skip


def summarize(
    s: DemoSettings,
    train_metrics: dict[str, dict[str, Any]],
    transfer: dict[str, Any],
    query: dict[str, Any],
    times: dict[str, float],
) -> dict[str, Any]:
    """Rows of (setting, measure, standard, defective), and a tally of who resisted more."""
    rows = [
        _row("clean", "test accuracy (whole test split)",
             {m: train_metrics[m]["test_accuracy"] for m in MODELS}, "higher"),
    ]  # fmt: skip
    by_key = {(r["target"], r["attack"], r["eps_255"]): r for r in transfer["rows"]}
    tally = {"defective": 0, "standard": 0, "tie": 0}
    for attack in s.attacks:
        for eps in s.eps_255:
            cells = {m: by_key[(m, attack, eps)] for m in MODELS}
            setting = f"transfer {attack.upper()} {eps:g}/255"
            acc = {m: c["accuracy_adversarial"] for m, c in cells.items()}
            rows.append(_row(setting, "accuracy under attack", acc, "higher"))
            metric = {m: c["transfer_accuracy"] for m, c in cells.items()}
            rows.append(_row(setting, "paper's transfer metric", metric, "higher"))
            if acc["defective"] > acc["standard"]:
                tally["defective"] += 1
            elif acc["defective"] < acc["standard"]:
                tally["standard"] += 1
            else:
                tally["tie"] += 1
    models = query["models"]
    last = {m: models[m]["by_budget"][-1] for m in MODELS}
    setting = f"query {s.query_attack} ({s.query_budget} queries/image)"
    rows.append(_row(setting, "success rate", {m: v["success_rate"] for m, v in last.items()},
                     "lower"))  # fmt: skip
    rows.append(_row(setting, "median queries to succeed",
                     {m: v["median_queries"] for m, v in last.items()}, "higher"))  # fmt: skip
    if query.get("decision_based"):
        rows.append(_row(setting, "median L2 of the closest adversarial",
                         {m: v.get("median_l2") for m, v in last.items()}, "higher"))  # fmt: skip
    return {
        "rows": rows,
        "transfer_tally": tally,
        "surrogates": transfer["config"]["surrogates"],
        "transfer_images": transfer["dataset"]["images"],
        "query_images": query["dataset"]["images"],
        "dataset": transfer["dataset"]["source"],
        "queries": {
            m: transfer["queries"][m]["images"] + query["queries"][m]["images"] for m in MODELS
        },
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def table(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (also readable on a terminal)."""
    lines = ["| setting | measure | standard | defective | better |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['setting']} | {r['measure']} | {_fmt(r['standard'])} | "
                     f"{_fmt(r['defective'])} | {r['better']} |")  # fmt: skip
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    t = summary["transfer_tally"]
    n = sum(t.values())
    return (f"Transfer attacks: the defective model kept higher accuracy in {t['defective']} of "
            f"{n} settings, the standard one in {t['standard']}, {t['tie']} tied.")  # fmt: skip


def _plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["measure"] == "accuracy under attack"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    for k, (m, color) in enumerate(zip(MODELS, ("tab:gray", "tab:blue"), strict=True)):
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], [r[m] for r in rows], width=0.38,
               label=m, color=color)  # fmt: skip
    ax.set_xticks(list(xs), [r["setting"].removeprefix("transfer ") for r in rows],
                  rotation=45, ha="right")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy under transfer attack")
    ax.set_title(f"{summary['transfer_images']} test images, surrogate crafted locally")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.md and summary.png in the run folder; the table and verdict on the console."""
    text = "\n".join([
        "# defcnn demo: standard vs defective, attacked through the served endpoints",
        "",
        f"Data: {summary['dataset']}. Transfer attacks on {summary['transfer_images']} test "
        f"images from {', '.join(summary['surrogates'])}; query attack on "
        f"{summary['query_images']} images. Images sent to the endpoint: "
        + ", ".join(f"{m} {q}" for m, q in summary["queries"].items()) + ".",
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
