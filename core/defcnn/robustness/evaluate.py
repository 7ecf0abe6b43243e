"""Accuracy of several checkpoints on the same corrupted test images, as one table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defcnn.robustness.corruptions import gaussian_noise, patch_shuffle
from defcnn.training import evaluate


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
) -> list[dict[str, Any]]:
    """One row per (corruption, level): each model's accuracy, and its ratio to clean.

    Every model sees the same corrupted images (the corruption is seeded once per level).
    """
    settings: list[tuple[str, float, np.ndarray]] = [("clean", 0, images)]
    settings += [("patch_shuffle", g, patch_shuffle(images, g, seed=seed)) for g in grids]
    settings += [("gaussian_noise", s, gaussian_noise(images, s, seed=seed)) for s in sigmas]
    rows: list[dict[str, Any]] = []
    clean: dict[str, float] = {}
    bar = tqdm(total=len(settings) * len(models), desc="corruptions", disable=not progress)
    for kind, level, x in settings:
        row: dict[str, Any] = {"corruption": kind, "level": level}
        for name, model in models.items():
            acc = evaluate(model, x, labels, batch_size=batch_size, device=device)["accuracy"]
            clean.setdefault(name, acc)
            row[name] = acc
            row[f"{name}_relative"] = acc / clean[name] if clean[name] else float("nan")
            bar.update(1)
        rows.append(row)
    bar.close()
    return rows


def corruption_table(rows: list[dict[str, Any]], names: Sequence[str]) -> str:
    """The rows as a Markdown table: accuracy, and in brackets the fraction of clean kept."""
    head = "| corruption | level | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for row in rows:
        level = (
            f"{row['level']}x{row['level']}"
            if row["corruption"] == "patch_shuffle"
            else (f"sigma {row['level']:g}" if row["corruption"] == "gaussian_noise" else "-")
        )
        cells = [f"{row[n]:.3f} ({row[f'{n}_relative']:.2f})" for n in names]
        lines.append(f"| {row['corruption']} | {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
