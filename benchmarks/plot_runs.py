"""Plot test accuracy per epoch for training runs, from their metrics.json files.

    python benchmarks/plot_runs.py runs/std runs/def --labels standard defective \
        --title "digits" --out docs/img/digits.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        p.error("give one label per run")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for run, label in zip(args.runs, labels, strict=True):
        history = json.loads((run / "metrics.json").read_text())["history"]
        ax.plot(
            [h["epoch"] for h in history], [100 * h["test_accuracy"] for h in history],
            marker="o", label=label,
        )  # fmt: skip
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
