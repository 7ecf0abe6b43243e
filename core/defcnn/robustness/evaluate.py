"""Accuracy of several checkpoints on the same corrupted test images, as one table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defcnn import display
from defcnn.robustness.corruptions import gaussian_noise, patch_shuffle
from defcnn.training import evaluate


@dataclass(frozen=True)
class CorruptionRow:
    """One (corruption, level): each model's accuracy, and its fraction of the clean one."""

    corruption: str
    level: float
    accuracy: dict[str, float]
    relative: dict[str, float]  # accuracy / clean accuracy (NaN when clean is 0)

    def level_text(self) -> str:
        if self.corruption == "patch_shuffle":
            return f"{self.level:g}x{self.level:g}"
        if self.corruption == "gaussian_noise":
            return f"sigma {self.level:g}"
        return "-"

    def to_dict(self) -> dict[str, Any]:
        """Flat, as eval JSON files have it: `NAME` and `NAME_relative` per model."""
        out: dict[str, Any] = {"corruption": self.corruption, "level": self.level}
        for name, acc in self.accuracy.items():
            out[name] = acc
            out[f"{name}_relative"] = self.relative[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorruptionRow:
        names = [k for k in data if f"{k}_relative" in data]
        return cls(
            corruption=data["corruption"], level=data["level"],
            accuracy={n: data[n] for n in names},
            relative={n: data[f"{n}_relative"] for n in names},
        )  # fmt: skip


@dataclass(frozen=True)
class EvaluationResult:
    """`defcnn evaluate`: which checkpoints, on which images, and the rows."""

    dataset: str
    images: int
    seed: int
    checkpoints: dict[str, str]  # short name -> path
    rows: tuple[CorruptionRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "images": self.images, "seed": self.seed,
            "checkpoints": dict(self.checkpoints), "rows": [r.to_dict() for r in self.rows],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        return cls(
            dataset=data["dataset"], images=int(data["images"]), seed=int(data["seed"]),
            checkpoints=dict(data["checkpoints"]),
            rows=tuple(CorruptionRow.from_dict(r) for r in data["rows"]),
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
    """One row per (corruption, level): each model's accuracy, and its ratio to clean.

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
        for name, model in models.items():
            acc = evaluate(model, x, labels, batch_size=batch_size, device=device)["accuracy"]
            clean.setdefault(name, acc)
            accuracy[name] = acc
            relative[name] = acc / clean[name] if clean[name] else float("nan")
            bar.update(1)
        rows.append(CorruptionRow(kind, level, accuracy, relative))
    bar.close()
    return rows


def corruption_table(rows: Sequence[CorruptionRow], names: Sequence[str]) -> str:
    """The rows as a Markdown table: accuracy, and in brackets the fraction of clean kept."""
    head = "| corruption | level | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for row in rows:
        cells = [
            f"{display.number(row.accuracy[n])} ({display.number(row.relative[n], digits=2)})"
            for n in names
        ]
        lines.append(f"| {row.corruption} | {row.level_text()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
