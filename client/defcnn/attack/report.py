"""The report folder: results.json (every number), report.md (tables), plots, image grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from defcnn import display
from defcnn.atomic import write_json, write_text
from defcnn.attack.results import (
    ModelQueryResult,
    QueryResult,
    TransferResult,
    TransferRow,
    queries_text,
    rate_text,
    totals_text,
)
from defcnn.stats import Estimate

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_results(out: Path, results: TransferResult | QueryResult) -> None:
    write_json(out / "results.json", results.to_dict())


def _table(rows: Sequence[Any], columns: dict[str, Callable[[Any], str]]) -> str:
    """A Markdown table: one column per (header, cell text of a row)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def _figure_text(value: float, ci: tuple[float, float] | None) -> str:
    """A Boundary figure in e-notation (its values are ~1e-4: 3 decimals would show 0.000),
    with its interval where there is one."""
    if value != value:  # NaN: no image had an adversarial
        return display.MISSING
    return f"{value:.2e}" if ci is None else Estimate(value, *ci).text(".2e")


def _numbers(*names: str, show: Callable[[Any], str] = display.number) -> dict[str, Any]:
    """Columns that show the row attribute of the same name."""
    return {n: (lambda r, n=n: show(getattr(r, n))) for n in names}


def _rates(*names: str) -> dict[str, Any]:
    """Columns of a rate and its interval (the row attribute `NAME_ci`)."""
    return {n: (lambda r, n=n: rate_text(getattr(r, n), getattr(r, f"{n}_ci"))) for n in names}


def _spec_lines(results: TransferResult | QueryResult) -> list[str]:
    return ["", "Endpoint models:", ""] + [f"- {s.describe()}" for s in results.specs.values()]


def _param_lines(results: TransferResult) -> list[str]:
    def value(k: str, v: Any) -> str:
        return f"{v * 255:g}/255" if k == "step" else display.number(v)

    shown = [f"{a} " + ", ".join(f"{k} {value(k, v)}" for k, v in p.items())
             for a, p in results.attack_params.items() if p]  # fmt: skip
    return ["", "Attack settings: " + "; ".join(shown) + "."] if shown else []


def _query_lines(results: TransferResult | QueryResult) -> list[str]:
    if results.totals.runs <= 1:
        return [f"Queries sent: {queries_text(results.queries)}."]
    lines = [f"Queries sent by this run: {queries_text(results.queries)}."]
    if results.totals.runs > 1:
        lines.append(f"All runs into this folder together: {totals_text(results.totals)}.")
    return lines


def transfer_report(out: Path, results: TransferResult) -> None:
    rows = results.rows
    columns = {
        "target": lambda r: r.target,
        "attack": lambda r: r.attack,
        "eps_255": lambda r: "L2" if r.eps_255 is None else f"{r.eps_255:g}",
        **_numbers("images", "accuracy_clean"),
        **_rates("accuracy_adversarial", "transfer_accuracy"),
        **_numbers("transfer_subset"),
        **_rates("success_rate"),
        **_numbers("source_fooled", "mean_linf", "mean_l2"),
    }
    s = results.settings
    text = [
        "# Transfer attack report",
        "",
        f"Endpoint `{s.endpoint.url}`, surrogates: " + ", ".join(f"`{p}`" for p in s.surrogates),
        f"Data: {results.dataset.source} ({results.dataset.images} test images, "
        f"seed {s.data.seed}). Adversarial images were rounded to uint8 before "
        "they were sent; every number is judged on what was sent.",
        *_spec_lines(results),
        *_param_lines(results),
        "",
        "`transfer_accuracy` is the paper's metric: the target's accuracy on adversarial "
        "examples that fool the surrogate and whose clean image the target classifies "
        "correctly (higher = more robust). Rates show their 95% Wilson interval.",
        "",
        _table(rows, columns),
        "",
        *_query_lines(results),
        "",
        "![robust accuracy vs eps](robust_accuracy.png)",
        "",
        "![examples](examples.png)",
        "",
    ]
    write_text(out / "report.md", "\n".join(text))
    _plot_transfer(out / "robust_accuracy.png", rows)


def _plot_transfer(path: Path, rows: Sequence[TransferRow]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    for target, attack in sorted({(r.target, r.attack) for r in rows}):
        pts = sorted(
            (r.eps_255, r.accuracy_adversarial)
            for r in rows
            if r.target == target and r.attack == attack and r.eps_255 is not None
        )
        ax.plot(
            [p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{target} ({attack})"
        )
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def query_report(out: Path, results: QueryResult) -> None:
    s = results.settings
    text = [
        "# Query attack report",
        "",
        f"Endpoint `{s.endpoint.url}`, attack `{s.attack}` "
        f"(ART {results.versions.get('art', 'version unknown')}), budget {s.budget} "
        f"queries per image, eps {s.eps_255:g}/255 (Square, SimBA).",
        f"Data: {results.dataset.source}, seed {s.data.seed}. Images the "
        "endpoint misclassifies when clean are not attacked (counted as `skipped`). "
        "Rates show their 95% Wilson interval.",
        *_spec_lines(results),
        "",
    ]
    columns = {
        **_numbers("budget", "images"),
        "success_rate": lambda r: rate_text(r.success_rate, ModelQueryResult.success_ci(r)),
        **_numbers("mean_queries", "median_queries", show=display.queries),
    }
    if results.decision_based:
        columns |= {**_numbers("median_l2", show=display.distance), **_numbers("l2_found")}
    for model, entry in results.models.items():
        text += [
            f"## {model}",
            "",
            f"clean accuracy {rate_text(entry.clean_accuracy, entry.clean_accuracy_ci)}, "
            f"accuracy under attack "
            f"{rate_text(entry.accuracy_under_attack, entry.accuracy_under_attack_ci)}, "
            f"attacked {entry.attacked}, skipped {entry.skipped}",
            "",
        ]
        text += [_table(entry.by_budget, columns), ""]
        if entry.boundary_figure is not None:
            bf = entry.boundary_figure
            text += [
                f"The paper's figure ||delta||^2/(3HW) of the closest adversarial [95% bootstrap "
                f"interval]: mean "
                f"{_figure_text(bf.mean, bf.mean_ci)}, median "
                f"{_figure_text(bf.median, bf.median_ci)} over {bf.images} images",
                "",
            ]
    text += [*_query_lines(results), ""]
    text += ["![success vs queries](success_vs_queries.png)", "", "![examples](examples.png)", ""]
    write_text(out / "report.md", "\n".join(text))
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    for model, entry in results.models.items():
        rows = entry.by_budget
        ax.plot(
            [r.budget for r in rows],
            [100 * r.success_rate for r in rows],
            marker="o",
            label=model,
        )
    ax.set_xscale("log")
    ax.set_xlabel("queries per image")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "success_vs_queries.png")
    plt.close(fig)


def image_grid(
    path: Path,
    clean: np.ndarray,
    adversarial: dict[str, np.ndarray],
    captions: dict[str, list[str]],
    clean_captions: list[str],
) -> None:
    """Columns: clean, then one adversarial image per model, captioned with the label the
    endpoint returned. Images are uint8 or float [N, 3, H, W]."""

    def hwc(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        return np.clip(x.transpose(1, 2, 0), 0, 1)

    n = len(clean)
    cols = 1 + len(adversarial)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), dpi=100, squeeze=False)
    for i in range(n):
        panels = [("clean", clean[i], clean_captions[i])] + [
            (m, adv[i], captions[m][i]) for m, adv in adversarial.items()
        ]
        for j, (title, img, caption) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(hwc(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=7)
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
