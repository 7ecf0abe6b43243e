"""Tables and figures of the CIFAR-10 reproduction, from the folders that
benchmarks/reproduce_cifar10.sh wrote (every number comes from a results.json there).

    python benchmarks/plot_cifar10.py runs/c10 --img docs/img > runs/c10/tables.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODELS = ("standard", "defective")
COLORS = {"standard": "tab:gray", "defective": "tab:blue"}
SURROGATES = ("resnet18", "vgg19", "densenet121")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _f(value: Any) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.3f}" if isinstance(value, float) else str(value))
    )


def transfer(runs: Path, img: Path) -> str:
    found = [s for s in SURROGATES if (runs / f"transfer-{s}" / "results.json").exists()]
    lines = ["| surrogate | attack | eps/255 | standard: acc under attack | defective: acc under "
             "attack | standard: paper metric (subset) | defective: paper metric (subset) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.4), squeeze=False)
    for ax, sur in zip(axes[0], found, strict=True):
        res = _load(runs / f"transfer-{sur}" / "results.json")
        keyed = {(r["target"], r["attack"], r["eps_255"]): r for r in res["rows"]}
        settings = sorted({(r["attack"], r["eps_255"]) for r in res["rows"]},
                          key=lambda k: (("fgsm", "pgd", "mifgsm").index(k[0]), k[1]))  # fmt: skip
        for attack, eps in settings:
            s, d = keyed[("standard", attack, eps)], keyed[("defective", attack, eps)]
            lines.append(
                f"| {sur} | {attack} | {eps:g} | {_f(s['accuracy_adversarial'])} | "
                f"{_f(d['accuracy_adversarial'])} | {_f(s['transfer_accuracy'])} "
                f"({s['transfer_subset']}) | {_f(d['transfer_accuracy'])} "
                f"({d['transfer_subset']}) |"
            )
        xs = np.arange(len(settings))
        for k, m in enumerate(MODELS):
            values = [keyed[(m, a, e)]["accuracy_adversarial"] for a, e in settings]
            ax.bar(xs + (k - 0.5) * 0.4, values, 0.4, label=m, color=COLORS[m])
            clean = keyed[(m, settings[0][0], settings[0][1])]["accuracy_clean"]
            ax.axhline(clean, color=COLORS[m], ls=":", lw=1)
        ax.set_xticks(xs, [f"{a} {e:g}" for a, e in settings], rotation=60, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"surrogate: {sur}")
    axes[0][0].set_ylabel("accuracy under transfer attack\n(dotted: clean)")
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(img / "cifar10-transfer.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def corruptions(runs: Path, img: Path) -> str:
    res = _load(runs / "corruptions.json")
    names = dict(zip(("std", "def"), MODELS, strict=True))
    lines = ["| corruption | level | standard acc [95%] (kept) | defective acc [95%] (kept) |",
             "|---|---|---|---|"]  # fmt: skip

    def cell(r: dict[str, Any], key: str) -> str:
        # `KEY_ci`: the 95% Wilson interval (absent in files written before it was added)
        ci = r.get(f"{key}_ci")
        interval = "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        return f"{r[key]:.3f}{interval} ({r[f'{key}_relative']:.2f})"

    for r in res["rows"]:
        std, dfc = cell(r, "std"), cell(r, "def")
        lines.append(f"| {r['corruption']} | {r['level']:g} | {std} | {dfc} |")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, kind, label in ((axes[0], "patch_shuffle", "patch grid k (k x k patches)"),
                            (axes[1], "gaussian_noise", "noise sigma")):  # fmt: skip
        rows = [r for r in res["rows"] if r["corruption"] in ("clean", kind)]
        for key, m in names.items():
            ax.plot([r["level"] if r["corruption"] != "clean" else (1 if kind == "patch_shuffle"
                     else 0) for r in rows], [r[f"{key}_relative"] for r in rows], "o-",
                    label=m, color=COLORS[m])  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("accuracy / clean accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(img / "cifar10-corruptions.png", dpi=100)
    plt.close(fig)
    return f"{res['images']} test images ({res['dataset']}), seed {res['seed']}\n\n" + "\n".join(
        lines
    )


def boundary(runs: Path, img: Path) -> str:
    res = _load(runs / "boundary" / "results.json")
    budget = res["config"]["budget"]
    grid = np.unique(np.geomspace(1, budget, 60).astype(int))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    lines = [
        "| model | clean acc | attacked | mean L2^2/(3HW) | median L2^2/(3HW) | "
        "median L2 at 1000 queries | at budget |",
        "|---|---|---|---|---|---|---|",
    ]
    figure = {}
    for m in MODELS:
        entry = res["models"][m]
        traces = entry["traces"].values()
        curve = []
        for b in grid:
            best = [min((l2 for q, l2 in t["improvements"] if q <= b), default=None)
                    for t in traces]  # fmt: skip
            found = [v for v in best if v is not None]
            curve.append(np.median(found) if found else np.nan)
        ax.plot(grid, curve, label=m, color=COLORS[m])
        at = {r["budget"]: r.get("median_l2") for r in entry["by_budget"]}
        figure[m] = entry["boundary_figure"]
        lines.append(f"| {m} | {entry['clean_accuracy']:.3f} | {entry['attacked']} | "
                     f"{figure[m]['mean']:.2e} | {figure[m]['median']:.2e} | "
                     f"{_f(at.get(1000))} | {_f(at.get(budget))} |")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("queries per image")
    ax.set_ylabel("median L2 of the closest adversarial")
    ax.set_title("Boundary attack through the endpoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "cifar10-boundary.png", dpi=100)
    plt.close(fig)
    ratio = figure["defective"]["mean"] / figure["standard"]["mean"]
    median_ratio = figure["defective"]["median"] / figure["standard"]["median"]
    return ("\n".join(lines) + f"\n\nRatio defective/standard of the mean figure: {ratio:.2f}"
            f" (of the median: {median_ratio:.2f}); the paper reports about 4.7.")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the RUNS folder of reproduce_cifar10.sh")
    p.add_argument("--img", type=Path, required=True, help="folder for the PNG figures")
    args = p.parse_args()
    args.img.mkdir(parents=True, exist_ok=True)
    for title, make in (("Transfer", transfer), ("Corruptions", corruptions),
                        ("Boundary", boundary)):  # fmt: skip
        print(f"## {title}\n\n{make(args.runs, args.img)}\n")


if __name__ == "__main__":
    main()
