"""The paper's claims on CIFAR-10, from the folders benchmarks/reproduce_cifar10.sh wrote:
results.json with every number and its 95% interval, the figures, and the Markdown tables
(the claims table first) that docs/results.md quotes.

    python benchmarks/cifar10_claims.py runs/c10 --img docs/img --json docs/results-cifar10.json

Three targets per seed S: `standard-sS` and `defective-sS` (same seed and schedule) and
`control-sS`, the standard run stopped at the defective one's clean accuracy. A difference
counts for one side only when its interval (Newcombe's, from the Wilson intervals) excludes
zero; the verdicts below follow from those counts by fixed rules, written once here. A
claim against the control is inconclusive unless, for every seed it uses, the control
stopped and came within MATCH_TOLERANCE of the defective's clean accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _machine import machine

from defcnn.atomic import atomic_write, write_json
from defcnn.stats import (
    Difference,
    Rate,
    Statistic,
    bootstrap_ratio,
    difference,
    difference_of_differences,
    rate_of,
)

ROLES = ("standard", "defective", "control")
RUN_PREFIX = {"standard": "std", "defective": "def", "control": "ctl"}
LABELS = {
    "standard": "standard",
    "defective": "defective (keep 0.1)",
    "control": "standard, stopped at the defective's accuracy",
}
COLORS = {"standard": "tab:gray", "defective": "tab:blue", "control": "tab:orange"}
ATTACK_ORDER = ("fgsm", "pgd", "mifgsm")
PAPER_BOUNDARY_RATIO = 4.7  # mean ‖delta‖^2/(3HW), keep 0.1 over standard ResNet-18
REPRODUCE = "benchmarks/reproduce_cifar10.sh"
STATISTICS: tuple[Statistic, ...] = ("mean", "median")
# A control is matched when it stopped (reached its --stop-at-accuracy target) and its clean
# accuracy is within this of the defective one's; a claim against an unmatched one is moot.
MATCH_TOLERANCE = 0.02
MIN_IMAGES = 50  # the fewest images in each figure of a decision-attack ratio (the issue's)
TALLY_NOTE = (
    "The tallies count settings (or levels) whose 95% interval excludes zero; those tests "
    "are correlated (the same images, models and surrogates throughout) and carry no "
    "multiple-comparison correction, so a tally is a summary, not a significance test."
)


@dataclass(frozen=True)
class Claim:
    claim: str
    paper: str
    ours: str
    verdict: str
    command: str


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _ci(rate: Rate) -> list[float]:
    return [rate.low, rate.high]


def _cell(rate: Rate) -> str:
    return str(rate)


def _ci_text(value: float, ci: list[float], fmt: str = ".3f") -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _est_dict(d: Difference) -> dict[str, Any]:
    return {"value": d.value, "ci": [d.low, d.high], "sign": d.sign}


def _signed(d: dict[str, Any]) -> str:
    """A stored difference with its interval: `+0.123 [+0.050, +0.190]`."""
    return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _diff_dict(a: Rate, b: Rate) -> dict[str, Any]:
    return _est_dict(difference(a, b))


def seeds_of(runs: Path) -> list[int]:
    found = [re.fullmatch(r"def-s(\d+)", p.name) for p in runs.iterdir() if p.is_dir()]
    return sorted(
        int(m.group(1)) for m in found if m and (runs / m.group(0) / "metrics.json").exists()
    )


def models(runs: Path, seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Clean accuracy (whole test split, Wilson) and training budget of every target; for a
    control also `gap`, |control - defective| clean accuracy, which with `stopped_at_step`
    (None: its target was never reached) says whether it is matched."""
    out: dict[str, dict[str, Any]] = {}
    for s in seeds:
        for role in ROLES:
            folder = runs / f"{RUN_PREFIX[role]}-s{s}"
            if not (folder / "metrics.json").exists():
                continue
            m, cfg = _load(folder / "metrics.json"), _load(folder / "config.json")
            n = int(m["history"][-1]["test_count"])
            rate = rate_of(m["test_accuracy"], n)
            out[f"{role}-s{s}"] = {
                "role": role,
                "seed": s,
                "test_accuracy": rate.value,
                "test_accuracy_ci": _ci(rate),
                "test_images": n,
                "epochs_scheduled": cfg["epochs"],
                "epochs_trained": m.get("stopped_at_epoch") or m["epochs_completed"],
                "stop_at_accuracy": cfg.get("stop_at_accuracy"),
                "stopped_at_step": m.get("stopped_at_step"),
                "train_seconds": m["seconds_this_session"],
                "history": [(h["step"], h["test_accuracy"]) for h in m["history"]],
                "checks": [(c["step"], c["test_accuracy"]) for c in m.get("checks", [])],
            }
            defective = out.get(f"defective-s{s}")
            if role == "control":
                out[f"{role}-s{s}"]["gap"] = (
                    None if defective is None else abs(rate.value - defective["test_accuracy"])
                )
    return out


def control_mismatch(acc: dict[str, Any], seeds: list[int]) -> str | None:
    """The verdict of a claim against the control when, for any of `seeds`, the control is
    not matched (it did not stop, or its gap exceeds MATCH_TOLERANCE); None when all are."""
    bad = []
    for s in sorted(set(seeds)):
        ctl = acc.get(f"control-s{s}")
        if ctl is None or ctl.get("gap") is None:
            return f"inconclusive: control not matched (seed {s} lacks a control or defective run)"
        stopped = ctl.get("stopped_at_step") is not None
        if not stopped or ctl["gap"] > MATCH_TOLERANCE:
            bad.append((ctl["gap"], s, stopped))
    if not bad:
        return None
    gap, s, stopped = max(bad)
    return f"inconclusive: control not matched (gap {gap:.3f}), seed {s}" + (
        "" if stopped else ": it never reached its target"
    )


def transfer(runs: Path) -> dict[str, Any]:
    """Per surrogate, attack, eps and seed: each target's accuracy under attack and the
    paper's metric with Wilson intervals, and the differences between targets."""
    out: dict[str, Any] = {}
    groups: dict[str, list[Path]] = {}  # surrogate: its runs, transfer-SUR or transfer-SUR-sS
    for folder in sorted(runs.glob("transfer-*")):
        if (folder / "results.json").exists():
            named = re.fullmatch(r"transfer-(.+?)(-s\d+)?", folder.name)
            assert named is not None  # the glob's prefix
            groups.setdefault(named.group(1), []).append(folder)
    for surrogate, folders in groups.items():
        cells: list[dict[str, Any]] = []
        first: tuple[Path, dict[str, Any]] | None = None
        for folder in folders:
            res = _load(folder / "results.json")
            setting = {"images": res["dataset"]["images"], "seed": res["config"]["seed"]}
            if first is None:
                first = (folder, setting)
            elif setting != first[1]:
                raise SystemExit(f"{folder} was run with other settings than {first[0]}")
            cells += _transfer_cells(folder, res, {c["seed"] for c in cells})
        assert first is not None
        out[surrogate] = {**first[1], "cells": cells, "versions": res["versions"]}
    return out


def _transfer_cells(folder: Path, res: dict[str, Any], seen: set[int]) -> list[dict[str, Any]]:
    """The cells of one transfer run; a seed another run of this surrogate has is refused."""
    cells = []
    keyed = {(r["target"], r["attack"], r["eps_255"]): r for r in res["rows"]}
    seeds = sorted({int(t.rsplit("-s", 1)[1]) for t, _, _ in keyed})
    if seen & set(seeds):
        raise SystemExit(f"{folder}: seed {min(seen & set(seeds))} has two transfer runs")
    settings = sorted({(a, e) for _, a, e in keyed}, key=lambda k: (ATTACK_ORDER.index(k[0]), k[1]))
    for s in seeds:
        for attack, eps in settings:
            found = {role: keyed.get((f"{role}-s{s}", attack, eps)) for role in ROLES}
            rows = {ro: r for ro, r in found.items() if r is not None}
            missing = [f"{ro}-s{s}" for ro in ROLES if ro not in rows]
            if missing:
                raise SystemExit(
                    f"{folder / 'results.json'}: {attack} at eps {eps:g}/255 has no row "
                    f"for {', '.join(missing)} (every seed needs all of "
                    f"{', '.join(ROLES)}): rerun its transfer attack"
                )
            under = {ro: rate_of(r["accuracy_adversarial"], r["images"]) for ro, r in rows.items()}
            metric = {
                ro: rate_of(r["transfer_accuracy"], r["transfer_subset"])
                for ro, r in rows.items()
                if r["transfer_subset"]
            }
            cell: dict[str, Any] = {"seed": s, "attack": attack, "eps_255": eps}
            for ro in ROLES:
                cell[ro] = {
                    "accuracy_under_attack": under[ro].value,
                    "accuracy_under_attack_ci": _ci(under[ro]),
                    "images": under[ro].trials,
                    "transfer_metric": metric[ro].value if ro in metric else None,
                    "transfer_metric_ci": _ci(metric[ro]) if ro in metric else None,
                    "transfer_subset": rows[ro]["transfer_subset"],
                }
            for a, b in (
                ("defective", "control"),
                ("defective", "standard"),
                ("control", "standard"),
            ):
                cell[f"{a}-{b}"] = _diff_dict(under[a], under[b])
                if a in metric and b in metric:
                    cell[f"{a}-{b} metric"] = _diff_dict(metric[a], metric[b])
            cells.append(cell)
    return cells


def _corruption_rates(row: dict[str, Any], seed: int, images: int) -> dict[str, Rate]:
    return {ro: rate_of(row[f"{RUN_PREFIX[ro]}-s{seed}"], images) for ro in ROLES}


def corruptions(runs: Path, seeds: list[int]) -> dict[str, Any]:
    """Patch shuffling and noise: each target's accuracy (Wilson), the differences, and
    the difference of drops from clean accuracy, defective minus control (the claims are
    about the drop: two models of different clean accuracy differ corrupted as well)."""
    out: dict[str, Any] = {}
    for s in seeds:
        path = runs / f"corruptions-s{s}.json"
        if not path.exists():
            continue
        res = _load(path)
        clean = [r for r in res["rows"] if r["corruption"] == "clean"]
        if len(clean) != 1:
            raise SystemExit(f"{path} has {len(clean)} clean rows, not 1: rerun its corruptions")
        base = _corruption_rates(clean[0], s, res["images"])
        rows = []
        for r in res["rows"]:
            rates = _corruption_rates(r, s, res["images"])
            row: dict[str, Any] = {"corruption": r["corruption"], "level": r["level"]}
            for ro, rate in rates.items():
                row[ro] = {
                    "accuracy": rate.value,
                    "ci": _ci(rate),
                    "kept": r[f"{RUN_PREFIX[ro]}-s{s}_relative"],
                }
            for a, b in (("defective", "control"), ("defective", "standard")):
                row[f"{a}-{b}"] = _diff_dict(rates[a], rates[b])
            if r["corruption"] != "clean":
                # (def_clean - def_level) - (ctl_clean - ctl_level): > 0, the defective drops more
                row["drop defective-control"] = _est_dict(
                    difference_of_differences(
                        base["defective"], rates["defective"], base["control"], rates["control"]
                    )
                )
            rows.append(row)
        out[str(s)] = {"images": res["images"], "rows": rows}
    return out


def _per_image_figure(entry: dict[str, Any], budget: int, pixels: int) -> list[float]:
    """‖delta‖^2/(3HW) of each attacked image's closest adversarial within the budget."""
    values = []
    for trace in entry["traces"].values():
        best = min((l2 for q, l2 in trace["improvements"] if q <= budget), default=None)
        if best is not None:
            values.append(best * best / pixels)
    return values


SAME_SETTING = ("budget", "data", "seed", "eps_255")  # what runs of one attack must share


def _decision_entry(
    path: Path, name: str, entry: dict[str, Any], budget: int, values: dict[str, list[float]]
) -> dict[str, Any]:
    """One target's figure from a query-attack run; its per-image values go into `values`."""
    fig = entry["boundary_figure"]
    if fig is None:
        raise SystemExit(f"{path} has no figure for {name}: rerun its attack")
    values[name] = _per_image_figure(entry, budget, 3 * 32 * 32)
    if values[name] and not np.isclose(np.mean(values[name]), fig["mean"], rtol=1e-3):
        raise SystemExit(f"{path}: {name}'s traces disagree with its figure")
    return {
        "clean_accuracy": entry["clean_accuracy"],
        "attacked": entry["attacked"],
        "found": fig["images"],
        "missing": fig["missing"],
        "mean": fig["mean"],
        "mean_ci": fig.get("mean_ci"),
        "median": fig["median"],
        "median_ci": fig.get("median_ci"),
    }


def decision(runs: Path) -> dict[str, Any]:
    """Boundary and HopSkipJump: the paper's figure per target with bootstrap intervals,
    and its ratio defective / standard and defective / control."""
    out: dict[str, Any] = {}
    for attack in ("boundary", "hopskipjump"):
        paths = sorted(runs.glob(f"{attack}-*/results.json"))  # one per set of targets
        if not paths:
            continue
        entries: dict[str, Any] = {}
        values: dict[str, list[float]] = {}
        first: dict[str, Any] | None = None
        for path in paths:
            res = _load(path)
            setting = {k: res["config"][k] for k in SAME_SETTING}
            if first is None:
                first, budget, images = setting, setting["budget"], res["dataset"]["images"]
            elif setting != first:
                raise SystemExit(f"{path} was run with other settings than {paths[0]}: {setting}")
            for name, entry in res["models"].items():
                if name in entries:
                    raise SystemExit(f"{name} has two {attack} runs (one in {path}); remove one")
                entries[name] = _decision_entry(path, name, entry, budget, values)
        ratios: dict[str, Any] = {}
        for name in entries:
            role, _, seed = name.rpartition("-s")
            for other in ("standard", "control"):
                base = f"{other}-s{seed}"
                if role == "defective" and base in values and values[name] and values[base]:
                    for stat in STATISTICS:
                        r = bootstrap_ratio(values[name], values[base], stat, seed=0)
                        ratios[f"{name}/{base} {stat}"] = {
                            "value": r.value,
                            "ci": [r.low, r.high],
                            "target": name,
                            "base": base,
                            "seed": int(seed),
                            "statistic": stat,
                        }
        out[attack] = {
            "budget": budget,
            "images": images,
            "models": entries,
            "ratios": ratios,
        }
    return out


# ---------------------------------------------------------------- tables and claims


def _tally(cells: list[dict[str, Any]], key: str) -> dict[str, int]:
    signs = [c[key]["sign"] for c in cells if key in c]
    return {"a": signs.count(1), "b": signs.count(-1), "tie": signs.count(0), "n": len(signs)}


def _majority(t: dict[str, int], *, a_wins: str, b_wins: str) -> str:
    """agrees/disagrees by a strict majority of settings beyond their intervals."""
    if t["n"] == 0:
        return "not measured"
    if t["a"] * 2 > t["n"]:
        return a_wins
    if t["b"] * 2 > t["n"]:
        return b_wins
    return "inconclusive"


def _tally_text(t: dict[str, int], a: str, b: str) -> str:
    return f"{a} higher in {t['a']} of {t['n']} settings, {b} in {t['b']}, {t['tie']} ties"


def mixed(metric: str, under: str) -> str:
    """A transfer verdict: the paper's metric decides, but where the accuracy under attack
    leads to another verdict, both are shown rather than one hidden."""
    return (
        metric if metric == under else f"mixed (metric: {metric}, accuracy under attack: {under})"
    )


def ratio_verdict(low: float, high: float, paper: float | None) -> str:
    """A ratio's 95% interval against the claim (> 1) and, where the paper quotes one, its
    size: a ratio above 1 does not by itself reproduce "about 4.7x"."""
    direction = "agrees in direction" if low > 1 else "disagrees" if high < 1 else "inconclusive"
    if paper is None:
        return direction
    if low <= paper <= high:
        return f"{direction}, agrees on size"
    return f"{direction}, disagrees on size ({paper:g} outside the 95% interval)"


def claims(data: dict[str, Any]) -> list[Claim]:
    """The claims table: each verdict by the fixed rules above; any claim against the
    control is inconclusive unless the control of every seed it uses is matched."""
    cells = [c for sur in data["transfer"].values() for c in sur["cells"]]
    transfer_seeds = sorted({c["seed"] for c in cells})
    acc = data["models"]
    out: list[Claim] = []
    gaps = []
    for m in acc.values():
        if m["role"] == "defective" and f"standard-s{m['seed']}" in acc:
            std = acc[f"standard-s{m['seed']}"]
            d = difference(
                rate_of(m["test_accuracy"], m["test_images"]),
                rate_of(std["test_accuracy"], std["test_images"]),
            )
            gaps.append(f"seed {m['seed']}: {d}")
    out.append(
        Claim(
            "Defective ResNet-18 (keep 0.1) is a few points less accurate than the standard one",
            "a few points below the standard model after full training",
            "defective - standard clean accuracy, " + "; ".join(gaps),
            "not tested (CPU-sized training, short of convergence)" if gaps else "not measured",
            f"{REPRODUCE} train",
        )
    )
    for key, other, label in (
        (
            "defective-control",
            "control",
            "Defective CNNs resist transfer attacks better than standard "
            "CNNs of comparable accuracy",
        ),
        (
            "defective-standard",
            "standard",
            "Defective CNNs resist transfer attacks better than standard "
            "CNNs (fully trained standard)",
        ),
    ):
        t, tm = _tally(cells, key), _tally(cells, f"{key} metric")
        verdict = mixed(
            _majority(tm, a_wins="agrees", b_wins="disagrees"),
            _majority(t, a_wins="agrees", b_wins="disagrees"),
        )
        if other == "control":
            verdict = control_mismatch(acc, transfer_seeds) or verdict
        out.append(
            Claim(
                label,
                "defective far more accurate under transfer (Table 1 of the paper)",
                f"accuracy under attack: {_tally_text(t, 'defective', other)}; "
                f"paper's metric: {_tally_text(tm, 'defective', other)}",
                verdict,
                f"{REPRODUCE} attack",
            )
        )
    t, tm = _tally(cells, "control-standard"), _tally(cells, "control-standard metric")
    yes, no = "yes: a confound to control for", "no"
    out.append(
        Claim(
            "(our control) Under-training alone makes a standard model resist transfer",
            "not in the paper",
            f"accuracy under attack: {_tally_text(t, 'stopped standard', 'full standard')}; "
            f"paper's metric: {_tally_text(tm, 'stopped standard', 'full standard')}",
            control_mismatch(acc, transfer_seeds)
            or mixed(_majority(tm, a_wins=yes, b_wins=no), _majority(t, a_wins=yes, b_wins=no)),
            f"{REPRODUCE} attack",
        )
    )
    for attack, label in (("boundary", "Boundary"), ("hopskipjump", "HopSkipJump")):
        dec = data["decision"].get(attack)
        if not dec:
            out.append(
                Claim(
                    f"{label}: larger perturbations needed against defective CNNs",
                    f"mean figure ratio about {PAPER_BOUNDARY_RATIO} (Boundary)",
                    "not measured",
                    "not measured",
                    f"{REPRODUCE} attack",
                )
            )
            continue
        size = PAPER_BOUNDARY_RATIO if attack == "boundary" else None
        parts, verdicts = [], []
        for r in dec["ratios"].values():
            if r["statistic"] != "mean":
                continue
            low, high = r["ci"]
            found = [dec["models"][n]["found"] for n in (r["target"], r["base"])]
            parts.append(
                f"{r['target']}/{r['base']}: {r['value']:.2f} [{low:.2f}, {high:.2f}] "
                f"({found[0]} and {found[1]} images)"
            )
            mismatch = (
                control_mismatch(acc, [r["seed"]]) if r["base"].startswith("control-") else None
            )
            if min(found) < MIN_IMAGES:
                v = f"inconclusive (fewer than {MIN_IMAGES} images)"
            else:
                v = mismatch or ratio_verdict(low, high, size)
            verdicts.append((r["base"], v))
        paper = (
            f"about {PAPER_BOUNDARY_RATIO}x (mean figure)"
            if attack == "boundary"
            else "larger (no figure quoted)"
        )
        if not verdicts:
            verdict = "not measured"
        elif len({v for _, v in verdicts}) == 1:
            verdict = verdicts[0][1]
        else:
            verdict = "mixed: " + "; ".join(f"vs {base}: {v}" for base, v in verdicts)
        out.append(
            Claim(
                f"{label}: defective CNNs need larger perturbations "
                f"({dec['budget']} queries/image, {dec['images']} images)",
                paper,
                "ratio of mean ‖delta‖^2/(3HW), " + "; ".join(parts),
                verdict,
                f"{REPRODUCE} attack",
            )
        )
    rows = [(int(s), r) for s, c in data["corruptions"].items() for r in c["rows"]]
    for corruption, label, paper, want in (
        (
            "patch_shuffle",
            "Patch shuffling hurts defective CNNs more (they rely on shape)",
            "defective loses more accuracy when patches are shuffled",
            1,
        ),
        (
            "gaussian_noise",
            "Defective CNNs are more robust to Gaussian noise",
            "more robust to additive noise",
            -1,
        ),
    ):
        # The drop from clean accuracy, defective minus control: > 0, the defective's is larger.
        sel = [(s, r) for s, r in rows if r["corruption"] == corruption]
        t = _tally([r for _, r in sel], "drop defective-control")
        if want < 0:  # the claim: a smaller drop than the accuracy-matched control's
            t = {"a": t["b"], "b": t["a"], "tie": t["tie"], "n": t["n"]}
        out.append(
            Claim(
                label + " (vs the accuracy-matched control)",
                paper,
                "drop from clean accuracy "
                + ("larger" if want > 0 else "smaller")
                + f" than the control's in {t['a']} of {t['n']} levels, the reverse in "
                f"{t['b']}, {t['tie']} ties",
                control_mismatch(acc, [s for s, _ in sel])
                or _majority(t, a_wins="agrees", b_wins="disagrees"),
                f"{REPRODUCE} attack",
            )
        )
    return out


def claims_table(rows: list[Claim]) -> str:
    lines = ["| claim | the paper | ours [95% CI] | verdict | command |", "|---|---|---|---|---|"]
    lines += [
        f"| {c.claim} | {c.paper} | {c.ours} | **{c.verdict}** | `{c.command}` |" for c in rows
    ]
    return "\n".join(lines) + f"\n\n{TALLY_NOTE}"


def models_table(acc: dict[str, Any]) -> str:
    lines = [
        "| target | seed | clean test accuracy [95% CI] | epochs trained (scheduled) | "
        "stopped at its target | gap to the defective | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in acc.values():
        rate = rate_of(m["test_accuracy"], m["test_images"])
        step, gap = m.get("stopped_at_step"), m.get("gap")
        if m["stop_at_accuracy"] is None:
            stopped = "-"
        else:
            stopped = "no" if step is None else f"yes, step {step}"
        if m["role"] != "control":
            gap_text = "-"
        elif gap is None:
            gap_text = "no defective run"
        else:
            matched = step is not None and gap <= MATCH_TOLERANCE
            gap_text = f"{gap:.3f} ({'matched' if matched else 'NOT matched'})"
        lines.append(
            f"| {LABELS[m['role']]} | {m['seed']} | {rate} | {m['epochs_trained']:.2f} "
            f"({m['epochs_scheduled']}) | {stopped} | {gap_text} | "
            f"{m['train_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def transfer_table(data: dict[str, Any]) -> str:
    lines = [
        "| surrogate | seed | attack | eps/255 | standard | defective | control | "
        "defective - control | defective - standard |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sur, res in data["transfer"].items():
        for c in res["cells"]:
            cells = [
                _ci_text(c[ro]["accuracy_under_attack"], c[ro]["accuracy_under_attack_ci"])
                for ro in ROLES
            ]
            diffs = [_signed(c[k]) for k in ("defective-control", "defective-standard")]
            lines.append(
                _md_row(sur, str(c["seed"]), c["attack"], f"{c['eps_255']:g}", *cells, *diffs)
            )
    return "\n".join(lines)


def metric_table(data: dict[str, Any]) -> str:
    lines = [
        "| surrogate | seed | attack | eps/255 | standard (subset) | defective (subset) | "
        "control (subset) |",
        "|---|---|---|---|---|---|---|",
    ]
    for sur, res in data["transfer"].items():
        for c in res["cells"]:
            cells = []
            for ro in ROLES:
                v, ci = c[ro]["transfer_metric"], c[ro]["transfer_metric_ci"]
                cells.append(
                    "-"
                    if v is None
                    else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({c[ro]['transfer_subset']})"
                )
            lines.append(_md_row(sur, str(c["seed"]), c["attack"], f"{c['eps_255']:g}", *cells))
    return "\n".join(lines)


def corruption_table(data: dict[str, Any]) -> str:
    lines = [
        "| seed | corruption | level | standard (kept) | defective (kept) | control (kept) | "
        "defective - control | drop from clean: defective - control |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, res in data["corruptions"].items():
        for r in res["rows"]:
            cells = [
                f"{r[ro]['accuracy']:.3f} [{r[ro]['ci'][0]:.3f}, {r[ro]['ci'][1]:.3f}] "
                f"({r[ro]['kept']:.2f})"
                for ro in ROLES
            ]
            d, drop = r["defective-control"], r.get("drop defective-control")
            drop_text = "-" if drop is None else _signed(drop)
            lines.append(
                _md_row(s, r["corruption"], f"{r['level']:g}", *cells, _signed(d), drop_text)
            )
    return "\n".join(lines)


def decision_table(data: dict[str, Any]) -> str:
    lines = [
        "| attack | target | clean acc | attacked | found | mean ‖delta‖^2/(3HW) [95%] | "
        "median [95%] |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, res in data["decision"].items():
        for name, e in res["models"].items():
            mean_ci = e["mean_ci"] or [float("nan")] * 2
            med_ci = e["median_ci"] or [float("nan")] * 2
            lines.append(
                f"| {attack} ({res['budget']} queries) | {name} | {e['clean_accuracy']:.3f} | "
                f"{e['attacked']} | {e['found']} | {e['mean']:.2e} [{mean_ci[0]:.2e}, "
                f"{mean_ci[1]:.2e}] | {e['median']:.2e} [{med_ci[0]:.2e}, {med_ci[1]:.2e}] |"
            )
        for key, r in res["ratios"].items():
            lines.append(
                f"| {attack} | ratio {key} | | | | {r['value']:.2f} [{r['ci'][0]:.2f}, "
                f"{r['ci'][1]:.2f}] | |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_transfer(data: dict[str, Any], img: Path) -> None:
    """One panel per surrogate (columns) and target seed (rows)."""
    surs = list(data["transfer"])
    if not surs:
        return
    seeds = sorted({c["seed"] for sur in surs for c in data["transfer"][sur]["cells"]})
    fig, axes = plt.subplots(
        len(seeds), len(surs), figsize=(5.5 * len(surs), 3.0 * len(seeds) + 0.6), squeeze=False
    )
    for col, sur in enumerate(surs):
        for row, seed in enumerate(seeds):
            ax = axes[row][col]
            cells = [c for c in data["transfer"][sur]["cells"] if c["seed"] == seed]
            xs = np.arange(len(cells))
            for k, ro in enumerate(ROLES):
                v = np.array([c[ro]["accuracy_under_attack"] for c in cells])
                ci = np.array([c[ro]["accuracy_under_attack_ci"] for c in cells]).T
                ax.bar(xs + (k - 1) * 0.27, v, 0.27, yerr=[v - ci[0], ci[1] - v], capsize=2,
                       label=LABELS[ro], color=COLORS[ro])  # fmt: skip
            last = row == len(seeds) - 1
            labels = [f"{c['attack']} {c['eps_255']:g}" for c in cells] if last else []
            ax.set_xticks(xs if last else [], labels, rotation=60, ha="right")
            ax.set_ylim(0, 1)
            ax.set_title(f"surrogate {sur}, seed {seed}", fontsize=9)
            if col == 0:
                ax.set_ylabel("accuracy under attack\n(95% Wilson)", fontsize=8)
    axes[0][0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    _save(fig, img / "cifar10-transfer.png")


def plot_corruptions(data: dict[str, Any], img: Path) -> None:
    """Patch shuffling and noise side by side (columns), one row per target seed."""
    if not data["corruptions"]:
        return
    seeds = list(data["corruptions"].items())
    fig, axes = plt.subplots(len(seeds), 2, figsize=(9, 2.9 * len(seeds) + 0.5), squeeze=False)
    for row, (seed, res) in enumerate(seeds):
        for ax, corruption in zip(axes[row], ("patch_shuffle", "gaussian_noise"), strict=True):
            rows = [r for r in res["rows"] if r["corruption"] in ("clean", corruption)]
            xs = np.arange(len(rows))
            for ro in ROLES:
                v = np.array([r[ro]["accuracy"] for r in rows])
                ci = np.array([r[ro]["ci"] for r in rows]).T
                ax.errorbar(xs, v, yerr=[v - ci[0], ci[1] - v], marker="o", capsize=3,
                            label=LABELS[ro], color=COLORS[ro])  # fmt: skip
            ticks = ["clean" if r["corruption"] == "clean" else f"{r['level']:g}" for r in rows]
            ax.set_xticks(xs, ticks)
            if row == len(seeds) - 1:
                ax.set_xlabel("grid k" if corruption == "patch_shuffle" else "noise sigma")
            ax.set_ylim(0, 1)
            ax.set_title(corruption.replace("_", " ") + f" (seed {seed})", fontsize=9)
        axes[row][0].set_ylabel("test accuracy (95% Wilson)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, img / "cifar10-corruptions.png")


def plot_decision(data: dict[str, Any], img: Path) -> None:
    if not data["decision"]:
        return
    fig, axes = plt.subplots(
        1, len(data["decision"]), figsize=(5 * len(data["decision"]), 3.4), squeeze=False
    )
    for ax, (attack, res) in zip(axes[0], data["decision"].items(), strict=True):
        names = list(res["models"])
        for k, stat in enumerate(("mean", "median")):
            v = np.array([res["models"][n][stat] for n in names])
            ci = np.array([res["models"][n][f"{stat}_ci"] or [np.nan, np.nan] for n in names]).T
            ax.bar(
                np.arange(len(names)) + (k - 0.5) * 0.38,
                v,
                0.38,
                yerr=[v - ci[0], ci[1] - v],
                capsize=3,
                label=stat,
                color=("tab:blue", "tab:green")[k],
            )
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"{attack}, {res['budget']} queries/image")
    axes[0][0].set_ylabel("‖delta‖^2/(3HW) (95% bootstrap)")
    axes[0][0].legend()
    fig.tight_layout()
    _save(fig, img / "cifar10-decision.png")


def plot_training(data: dict[str, Any], img: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for m in data["models"].values():
        steps, accs = zip(*m["history"], strict=True)
        ax.plot(
            steps,
            accs,
            marker=".",
            label=f"{LABELS[m['role']]} (seed {m['seed']})",
            color=COLORS[m["role"]],
            ls=("-", ":", "--", "-.")[m["seed"] % 4],
        )
        if m.get("checks"):  # the control's stopping checks, between its epochs
            steps, accs = zip(*m["checks"], strict=True)
            ax.scatter(steps, accs, s=4, color=COLORS[m["role"]], alpha=0.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, img / "cifar10-accuracy.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the RUNS folder of reproduce_cifar10.sh")
    p.add_argument("--img", type=Path, required=True, help="folder for the PNG figures")
    p.add_argument("--json", type=Path, required=True, help="where results.json goes")
    args = p.parse_args()
    seeds = seeds_of(args.runs)
    data: dict[str, Any] = {
        "machine": machine(),
        "seeds": seeds,
        "models": models(args.runs, seeds),
        "transfer": transfer(args.runs),
        "corruptions": corruptions(args.runs, seeds),
        "decision": decision(args.runs),
    }
    rows = claims(data)
    data["claims"] = [asdict(c) for c in rows]
    args.img.mkdir(parents=True, exist_ok=True)
    for plot in (plot_transfer, plot_corruptions, plot_decision, plot_training):
        plot(data, args.img)
    write_json(args.json, data)
    for title, text in (
        ("Claims", claims_table(rows)),
        ("Models", models_table(data["models"])),
        ("Transfer: accuracy under attack", transfer_table(data)),
        ("Transfer: the paper's metric", metric_table(data)),
        ("Corruptions", corruption_table(data)),
        ("Decision-based attacks", decision_table(data)),
    ):
        print(f"## {title}\n\n{text}\n")


if __name__ == "__main__":
    main()
