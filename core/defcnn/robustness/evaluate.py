"""Accuracy of several checkpoints on the same corrupted test images, as one table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defcnn import display
from defcnn.robustness.corruptions import gaussian_noise, patch_shuffle
from defcnn.stats import wilson
from defcnn.training import evaluate


@dataclass(frozen=True)
class CorruptionRow:
    """One (corruption, level): each model's accuracy with its 95% Wilson interval, and its
    fraction of the clean one. `accuracy_ci` lacks a model read from a file older than it."""

    corruption: str
    level: float
    accuracy: dict[str, float]
    relative: dict[str, float]  # accuracy / clean accuracy (NaN when clean is 0)
    accuracy_ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def level_text(self) -> str:
        if self.corruption == "patch_shuffle":
            return f"{self.level:g}x{self.level:g}"
        if self.corruption == "gaussian_noise":
            return f"sigma {self.level:g}"
        return "-"

    def to_dict(self) -> dict[str, Any]:
        """Flat, as eval JSON files have it: `NAME`, `NAME_ci` and `NAME_relative` per model."""
        out: dict[str, Any] = {"corruption": self.corruption, "level": self.level}
        for name, acc in self.accuracy.items():
            out[name] = acc
            if name in self.accuracy_ci:
                out[f"{name}_ci"] = list(self.accuracy_ci[name])
            out[f"{name}_relative"] = self.relative[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorruptionRow:
        names = [k for k in data if f"{k}_relative" in data]
        return cls(
            corruption=data["corruption"], level=data["level"],
            accuracy={n: data[n] for n in names},
            relative={n: data[f"{n}_relative"] for n in names},
            accuracy_ci={n: (float(data[f"{n}_ci"][0]), float(data[f"{n}_ci"][1]))
                         for n in names if data.get(f"{n}_ci") is not None},
        )  # fmt: skip


@dataclass(frozen=True)
class EvaluationResult:
    """`defcnn evaluate`: which checkpoints, on which images, and the rows."""

    dataset: str
    images: int
    seed: int
    checkpoints: dict[str, str]  # short name -> path
    rows: tuple[CorruptionRow, ...]
    # short name -> the checkpoint file's sha256: which weights these rows belong to
    checkpoint_sha256: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "images": self.images, "seed": self.seed,
            "checkpoints": dict(self.checkpoints),
            "checkpoint_sha256": dict(self.checkpoint_sha256),
            "rows": [r.to_dict() for r in self.rows],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        return cls(
            dataset=data["dataset"], images=int(data["images"]), seed=int(data["seed"]),
            checkpoints=dict(data["checkpoints"]),
            rows=tuple(CorruptionRow.from_dict(r) for r in data["rows"]),
            checkpoint_sha256=dict(data.get("checkpoint_sha256", {})),
        )  # fmt: skip

    def table(self) -> str:
        return corruption_table(self.rows, list(self.checkpoints))


def evaluate_corruptions(
    models: dict[str, torch.nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    grids: Sequence[int] = (2, 4, 8),
    sigmas: Sequence[float] = (0.05, 0.1),
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = True,
) -> list[CorruptionRow]:
    """One row per (corruption, level): each model's accuracy with its 95% Wilson interval,
    and its ratio to clean.

    Every model sees the same corrupted images (the corruption is seeded once per level).
    """
    settings: list[tuple[str, float, np.ndarray]] = [("clean", 0, images)]
    settings += [("patch_shuffle", g, patch_shuffle(images, g, seed=seed)) for g in grids]
    settings += [("gaussian_noise", s, gaussian_noise(images, s, seed=seed)) for s in sigmas]
    rows: list[CorruptionRow] = []
    clean: dict[str, float] = {}
    bar = tqdm(total=len(settings) * len(models), desc="corruptions", disable=not progress)
    for kind, level, x in settings:
        accuracy: dict[str, float] = {}
        relative: dict[str, float] = {}
        ci: dict[str, tuple[float, float]] = {}
        for name, model in models.items():
            scores = evaluate(model, x, labels, batch_size=batch_size, device=device)
            correct = int(scores["correct"])
            acc = correct / max(1, len(labels))
            if len(labels):
                rate = wilson(correct, len(labels))
                ci[name] = (rate.low, rate.high)
            clean.setdefault(name, acc)
            accuracy[name] = acc
            relative[name] = acc / clean[name] if clean[name] else float("nan")
            bar.update(1)
        rows.append(CorruptionRow(kind, level, accuracy, relative, ci))
    bar.close()
    return rows


def _accuracy_text(row: CorruptionRow, name: str) -> str:
    """`name`'s accuracy in `row` with its interval, `0.802 [0.794, 0.810]` (bare when the
    row was read from a file without intervals)."""
    text = display.number(row.accuracy[name])
    ci = row.accuracy_ci.get(name)
    if ci is None:
        return text
    return f"{text} [{display.number(ci[0])}, {display.number(ci[1])}]"


def corruption_table(rows: Sequence[CorruptionRow], names: Sequence[str]) -> str:
    """The rows as a Markdown table: accuracy [95% interval], and in parentheses the fraction
    of clean kept: `0.802 [0.794, 0.810] (1.00)`."""
    head = "| corruption | level | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for row in rows:
        cells = [
            f"{_accuracy_text(row, n)} ({display.number(row.relative[n], digits=2)})" for n in names
        ]
        lines.append(f"| {row.corruption} | {row.level_text()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
