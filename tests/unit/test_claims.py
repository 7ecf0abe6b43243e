"""The verdict rules of benchmarks/cifar10_claims.py, on small `data` dicts built here: the
strict majority, the matched control, decision-attack ratios (direction, size, too few
images), the transfer metric against accuracy under attack, and the drop-based shape claims.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from defcnn.stats import difference_of_differences, wilson

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import cifar10_claims as cc  # noqa: E402

VS_CONTROL = "Defective CNNs resist transfer attacks better than standard CNNs of comparable"
VS_STANDARD = "Defective CNNs resist transfer attacks better than standard CNNs (fully"
OUR_CONTROL = "(our control)"
BOUNDARY, HSJ = "Boundary:", "HopSkipJump:"
SHUFFLE, NOISE = "Patch shuffling", "Defective CNNs are more robust to Gaussian noise"
UNMATCHED = "inconclusive: control not matched (gap"
OUTSIDE = "disagrees on size (4.7 outside the 95% interval)"


def _models(gaps: dict[int, float], stopped: dict[int, bool] | None = None) -> dict[str, Any]:
    """Three targets per seed; the control misses the defective's accuracy by `gaps[seed]`."""
    acc: dict[str, Any] = {}
    for s, gap in gaps.items():
        ok = True if stopped is None else stopped[s]
        for role, value, step, extra in (
            ("standard", 0.90, None, {}),
            ("defective", 0.85, None, {}),
            ("control", 0.85 + gap, 400 if ok else None, {"gap": gap}),
        ):
            acc[f"{role}-s{s}"] = {
                "role": role,
                "seed": s,
                "test_accuracy": value,
                "test_images": 10000,
                "stopped_at_step": step,
                **extra,
            }
    return acc


def _sign(s: int) -> dict[str, Any]:
    return {"value": 0.1 * s, "ci": [0.1 * s - 0.05, 0.1 * s + 0.05], "sign": s}


def _cells(under: list[int], metric: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """Transfer cells whose every difference has the given signs, accuracy and metric."""
    keys = ("defective-control", "defective-standard", "control-standard")
    return [
        {"seed": seed, **{k: _sign(u) for k in keys}, **{f"{k} metric": _sign(m) for k in keys}}
        for u, m in zip(under, metric, strict=True)
    ]


def _ratio(target: str, base: str, ci: tuple[float, float]) -> dict[str, Any]:
    seed = int(base.rpartition("-s")[2])
    value = (ci[0] + ci[1]) / 2
    return {
        "value": value,
        "ci": list(ci),
        "target": target,
        "base": base,
        "seed": seed,
        "statistic": "mean",
    }


def _decision(
    ci: tuple[float, float],
    found: dict[str, int] | None = None,
    control_ci: tuple[float, float] | None = None,
) -> dict[str, Any]:
    found = {"defective-s0": 60, "standard-s0": 60, "control-s0": 60, **(found or {})}
    ratios = {
        "defective-s0/standard-s0 mean": _ratio("defective-s0", "standard-s0", ci),
        "defective-s0/standard-s0 median": _ratio("defective-s0", "standard-s0", (0.1, 0.2)),
        "defective-s0/control-s0 mean": _ratio("defective-s0", "control-s0", control_ci or ci),
    }
    ratios["defective-s0/standard-s0 median"]["statistic"] = "median"  # never decides
    return {
        "budget": 1000,
        "images": 100,
        "models": {n: {"found": f} for n, f in found.items()},
        "ratios": ratios,
    }


def _rows(drops: list[int], absolute: list[int], corruption: str) -> list[dict[str, Any]]:
    clean = {"corruption": "clean", "level": 0, "defective-control": _sign(0)}
    return [clean] + [
        {
            "corruption": corruption,
            "level": k + 1,
            "defective-control": _sign(a),
            "drop defective-control": _sign(d),
        }
        for k, (d, a) in enumerate(zip(drops, absolute, strict=True))
    ]


def _data(
    *,
    gaps: dict[int, float] | None = None,
    stopped: dict[int, bool] | None = None,
    cells: list[dict[str, Any]] | None = None,
    decision: dict[str, Any] | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "models": _models(gaps if gaps is not None else {0: 0.005}, stopped),
        "transfer": {"resnet18": {"cells": cells or []}},
        "decision": decision or {},
        "corruptions": {str(s): {"rows": rows} for s in (gaps or {0: 0})} if rows else {},
    }


def _claim(data: dict[str, Any], start: str) -> cc.Claim:
    found = [c for c in cc.claims(data) if c.claim.startswith(start)]
    assert len(found) == 1, [c.claim for c in cc.claims(data)]
    return found[0]


# ---------------------------------------------------------------- transfer: majority, mixed


@pytest.mark.parametrize(
    ("signs", "verdict"),
    [
        ([1, 1, 0], "agrees"),
        ([1, 1, -1], "agrees"),
        ([1, 0, 0], "inconclusive"),  # 1 of 3 is no majority
        ([1, 1, 0, 0], "inconclusive"),  # half is not a strict majority
        ([1, 1, -1, -1], "inconclusive"),
        ([-1, -1, 0], "disagrees"),
        ([0, 0, 0], "inconclusive"),
    ],
)
def test_transfer_verdict_is_a_strict_majority(signs: list[int], verdict: str) -> None:
    data = _data(cells=_cells(signs, signs))
    for start in (VS_CONTROL, VS_STANDARD):
        assert _claim(data, start).verdict == verdict
    ours = {"yes": "yes: a confound to control for", "no": "no"}
    expect = {"agrees": ours["yes"], "disagrees": ours["no"]}.get(verdict, verdict)
    assert _claim(data, OUR_CONTROL).verdict == expect


def test_no_transfer_cells_is_not_measured() -> None:
    assert _claim(_data(gaps={0: 0.5}), VS_CONTROL).verdict == "not measured"


@pytest.mark.parametrize(
    ("under", "metric", "verdict"),
    [
        ([1, 1, 1], [1, 1, 0], "agrees"),
        ([-1, -1, 0], [-1, -1, -1], "disagrees"),
        ([0, 0, 0], [-1, -1, 0], "mixed (metric: disagrees, accuracy under attack: inconclusive)"),
        ([-1, -1, -1], [1, 1, 1], "mixed (metric: agrees, accuracy under attack: disagrees)"),
        ([1, 1, 1], [-1, -1, 0], "mixed (metric: disagrees, accuracy under attack: agrees)"),
        ([1, 1, 1], [0, 0, 1], "mixed (metric: inconclusive, accuracy under attack: agrees)"),
    ],
)
def test_transfer_verdict_follows_the_papers_metric(
    under: list[int], metric: list[int], verdict: str
) -> None:
    data = _data(cells=_cells(under, metric))
    claim = _claim(data, VS_STANDARD)
    assert claim.verdict == verdict
    n = len(under)
    assert claim.ours == (
        f"accuracy under attack: defective higher in {under.count(1)} of {n} settings, "
        f"standard in {under.count(-1)}, {under.count(0)} ties; "
        f"paper's metric: defective higher in {metric.count(1)} of {n} settings, "
        f"standard in {metric.count(-1)}, {metric.count(0)} ties"
    )


# ---------------------------------------------------------------- the matched control


@pytest.mark.parametrize(
    ("gaps", "stopped", "unmatched", "boundary_matched"),
    [
        ({0: 0.005}, None, None, True),
        ({0: cc.MATCH_TOLERANCE}, None, None, True),  # the tolerance itself is still matched
        ({0: 0.03}, None, "0.030", False),
        ({0: 0.005}, {0: False}, "0.005", False),  # close, but it never reached its target
        # Any seed used: seed 1 is in the transfer cells and corruptions, not the Boundary
        # ratios (seed 0 only), which stand.
        ({0: 0.005, 1: 0.03}, None, "0.030", True),
        ({0: 0.005, 1: 0.01}, {0: True, 1: False}, "0.010", True),
    ],
)
def test_claims_against_the_control_need_a_matched_control(
    gaps: dict[int, float],
    stopped: dict[int, bool] | None,
    unmatched: str | None,
    boundary_matched: bool,
) -> None:
    cells = [c for s in gaps for c in _cells([1, 1, 1], [1, 1, 1], seed=s)]
    data = _data(
        gaps=gaps,
        stopped=stopped,
        cells=cells,
        decision={"boundary": _decision((4.0, 5.5))},
        rows=_rows([1, 1, 1], [-1, -1, -1], "patch_shuffle")
        + _rows([-1, -1, -1], [1, 1, 1], "gaussian_noise")[1:],
    )
    if unmatched is None:
        assert _claim(data, VS_CONTROL).verdict == "agrees"
        assert _claim(data, OUR_CONTROL).verdict == "yes: a confound to control for"
        assert _claim(data, SHUFFLE).verdict == "agrees"
        assert _claim(data, NOISE).verdict == "agrees"
    else:
        for start in (VS_CONTROL, OUR_CONTROL, SHUFFLE, NOISE):
            verdict = _claim(data, start).verdict
            assert verdict.startswith(f"{UNMATCHED} {unmatched})"), (start, verdict)
    boundary = _claim(data, BOUNDARY).verdict
    if boundary_matched:
        assert boundary == "agrees in direction, agrees on size"
    else:  # the ratio against the standard still stands, the one against the control not
        assert boundary.startswith(
            "mixed: vs standard-s0: agrees in direction, agrees on size; "
            f"vs control-s0: {UNMATCHED} {unmatched})"
        )
    # The claim against the fully trained standard never depends on the control.
    assert _claim(data, VS_STANDARD).verdict == "agrees"


def test_an_unmatched_control_of_an_unused_seed_does_not_count() -> None:
    # Seed 1's control is far off, but the transfer cells are all seed 0.
    data = _data(gaps={0: 0.005, 1: 0.2}, cells=_cells([1, 1, 1], [1, 1, 1], seed=0))
    assert _claim(data, VS_CONTROL).verdict == "agrees"


def test_control_mismatch_names_the_gap_and_a_control_that_never_stopped() -> None:
    acc = _models({0: 0.005, 1: 0.031}, {0: False, 1: True})
    assert cc.control_mismatch(acc, [0]) == (
        "inconclusive: control not matched (gap 0.005), seed 0: it never reached its target"
    )
    assert cc.control_mismatch(acc, [0, 1]) == (
        "inconclusive: control not matched (gap 0.031), seed 1"
    )
    assert cc.control_mismatch(_models({0: 0.01}), [0]) is None
    assert cc.control_mismatch(acc, []) is None


# ---------------------------------------------------------------- decision-based attacks


@pytest.mark.parametrize(
    ("attack", "ci", "verdict"),
    [
        ("boundary", (4.0, 5.5), "agrees in direction, agrees on size"),
        ("boundary", (1.2, 2.0), f"agrees in direction, {OUTSIDE}"),
        ("boundary", (5.0, 9.0), f"agrees in direction, {OUTSIDE}"),
        ("boundary", (0.5, 0.9), f"disagrees, {OUTSIDE}"),
        ("boundary", (0.8, 6.0), "inconclusive, agrees on size"),
        ("hopskipjump", (1.2, 2.0), "agrees in direction"),
        ("hopskipjump", (0.5, 0.9), "disagrees"),
        ("hopskipjump", (0.9, 1.1), "inconclusive"),
    ],
)
def test_decision_ratio_direction_and_size(
    attack: str, ci: tuple[float, float], verdict: str
) -> None:
    data = _data(decision={attack: _decision(ci)})
    claim = _claim(data, BOUNDARY if attack == "boundary" else HSJ)
    assert claim.verdict == verdict
    assert "(60 and 60 images)" in claim.ours


def test_decision_ratios_that_differ_are_shown_apart() -> None:
    data = _data(decision={"hopskipjump": _decision((1.2, 2.0), control_ci=(0.9, 1.1))})
    assert _claim(data, HSJ).verdict == (
        "mixed: vs standard-s0: agrees in direction; vs control-s0: inconclusive"
    )


def test_decision_ratios_with_one_verdict_give_it_once() -> None:
    data = _data(decision={"boundary": _decision((0.5, 1.9), control_ci=(0.4, 1.7))})
    assert _claim(data, BOUNDARY).verdict == f"inconclusive, {OUTSIDE}"


@pytest.mark.parametrize(
    ("found", "enough"),
    [
        ({"defective-s0": 49}, False),
        ({"standard-s0": 49, "control-s0": 49}, False),
        ({"defective-s0": 50, "standard-s0": 50, "control-s0": 50}, True),
    ],
)
def test_decision_needs_fifty_images_in_each_figure(found: dict[str, int], enough: bool) -> None:
    for attack, start in (("boundary", BOUNDARY), ("hopskipjump", HSJ)):
        verdict = _claim(_data(decision={attack: _decision((4.0, 5.5), found)}), start).verdict
        if enough:
            assert verdict.startswith("agrees in direction")
        else:
            assert verdict == "inconclusive (fewer than 50 images)"


def test_only_the_base_with_too_few_images_is_inconclusive() -> None:
    data = _data(decision={"hopskipjump": _decision((1.2, 2.0), {"control-s0": 10})})
    assert _claim(data, HSJ).verdict == (
        "mixed: vs standard-s0: agrees in direction; "
        "vs control-s0: inconclusive (fewer than 50 images)"
    )


def test_no_decision_results_is_not_measured() -> None:
    assert _claim(_data(), BOUNDARY).verdict == "not measured"


# ---------------------------------------------------------------- corruptions: the drop


@pytest.mark.parametrize(
    ("drops", "absolute", "shuffle", "noise"),
    [
        # Lower shuffled accuracy alone is no larger drop: the drops are tied.
        ([0, 0, 0], [-1, -1, -1], "inconclusive", "inconclusive"),
        # A larger drop even where the defective's shuffled accuracy is the higher one.
        ([1, 1, 0], [1, 1, 1], "agrees", "disagrees"),
        ([-1, -1, 0], [-1, -1, -1], "disagrees", "agrees"),
        ([1, -1, 0], [0, 0, 0], "inconclusive", "inconclusive"),
    ],
)
def test_shape_and_noise_verdicts_follow_the_drop(
    drops: list[int], absolute: list[int], shuffle: str, noise: str
) -> None:
    rows = _rows(drops, absolute, "patch_shuffle") + _rows(drops, absolute, "gaussian_noise")[1:]
    data = _data(rows=rows)
    claim = _claim(data, SHUFFLE)
    assert claim.verdict == shuffle
    assert claim.ours == (
        f"drop from clean accuracy larger than the control's in {drops.count(1)} of 3 levels, "
        f"the reverse in {drops.count(-1)}, {drops.count(0)} ties"
    )
    assert _claim(data, NOISE).verdict == noise


def test_the_claims_table_says_the_tallies_are_not_a_significance_test() -> None:
    text = cc.claims_table(cc.claims(_data()))
    assert "no multiple-comparison correction" in text
    assert "not a significance test" in text


# ---------------------------------------------------------------- reading the folders


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("control", [0.83, 0.77])  # the gap is a distance, either side
def test_models_records_the_stop_and_the_gap(tmp_path: Path, control: float) -> None:
    for prefix, value, stop in (("std", 0.90, None), ("def", 0.80, None), ("ctl", control, 0.79)):
        history = [{"step": 10, "test_accuracy": value, "test_count": 1000}]
        metrics: dict[str, Any] = {
            "test_accuracy": value,
            "history": history,
            "epochs_completed": 2,
            "seconds_this_session": 1.0,
        }
        if stop is not None:  # as training writes it: the control never reached its target
            metrics["stopped_at_step"] = None
        _write(tmp_path / f"{prefix}-s0" / "metrics.json", metrics)
        _write(tmp_path / f"{prefix}-s0" / "config.json", {"epochs": 2, "stop_at_accuracy": stop})
    acc = cc.models(tmp_path, cc.seeds_of(tmp_path))
    assert acc["control-s0"]["gap"] == pytest.approx(0.03)
    assert acc["control-s0"]["stopped_at_step"] is None
    assert "gap" not in acc["defective-s0"]
    assert cc.control_mismatch(acc, [0]) == (
        "inconclusive: control not matched (gap 0.030), seed 0: it never reached its target"
    )
    table = cc.models_table(acc)
    assert "| no | 0.030 (NOT matched) |" in table


def _transfer_run(folder: Path, targets: list[str], images: int = 100) -> None:
    rows = [
        {
            "target": t, "attack": "fgsm", "eps_255": 8, "accuracy_adversarial": 0.5,
            "images": images, "transfer_accuracy": 0.5, "transfer_subset": 50,
        }
        for t in targets
    ]  # fmt: skip
    results = {"rows": rows, "dataset": {"images": images}, "config": {"seed": 0}, "versions": {}}
    _write(folder / "results.json", results)


def test_transfer_refuses_a_setting_without_all_three_targets(tmp_path: Path) -> None:
    _transfer_run(tmp_path / "transfer-resnet18", ["standard-s0", "defective-s0"])
    with pytest.raises(SystemExit, match="no row for control-s0"):
        cc.transfer(tmp_path)


def _three(seed: int) -> list[str]:
    return [f"{role}-s{seed}" for role in cc.ROLES]


def test_transfer_merges_a_surrogates_runs_per_seed_and_refuses_repeats(tmp_path: Path) -> None:
    _transfer_run(tmp_path / "transfer-resnet18-s0", _three(0))
    _transfer_run(tmp_path / "transfer-resnet18-s1", _three(1))
    _transfer_run(tmp_path / "transfer-vgg16-s0", _three(0))
    res = cc.transfer(tmp_path)
    assert sorted(res) == ["resnet18", "vgg16"]
    assert [c["seed"] for c in res["resnet18"]["cells"]] == [0, 1]
    _transfer_run(tmp_path / "transfer-resnet18-s2", _three(1))
    with pytest.raises(SystemExit, match="seed 1 has two transfer runs"):
        cc.transfer(tmp_path)
    _transfer_run(tmp_path / "transfer-resnet18-s2", _three(2), images=200)
    with pytest.raises(SystemExit, match="other settings"):
        cc.transfer(tmp_path)


def test_corruptions_compute_the_difference_of_drops(tmp_path: Path) -> None:
    def row(corruption: str, level: float, std: float, de: float, ctl: float) -> dict[str, Any]:
        out: dict[str, Any] = {"corruption": corruption, "level": level}
        for prefix, v in (("std", std), ("def", de), ("ctl", ctl)):
            out[f"{prefix}-s0"], out[f"{prefix}-s0_relative"] = v, v
        return out

    _write(
        tmp_path / "corruptions-s0.json",
        {
            "images": 1000,
            "rows": [row("clean", 0, 0.9, 0.9, 0.9), row("patch_shuffle", 2, 0.8, 0.3, 0.8)],
        },
    )
    rows = cc.corruptions(tmp_path, [0])["0"]["rows"]
    assert "drop defective-control" not in rows[0]
    drop = rows[1]["drop defective-control"]
    want = difference_of_differences(
        wilson(900, 1000), wilson(300, 1000), wilson(900, 1000), wilson(800, 1000)
    )
    assert drop == {"value": pytest.approx(0.5), "ci": [want.low, want.high], "sign": 1}


def _query_run(folder: Path, l2: dict[str, list[float]], budget: int = 100) -> None:
    """A query-attack results.json with one trace per image: its closest L2 at 10 queries."""
    models = {}
    for name, norms in l2.items():
        figures = [v * v / (3 * 32 * 32) for v in norms]
        models[name] = {
            "clean_accuracy": 0.8, "attacked": len(norms),
            "traces": {str(i): {"improvements": [[10, v]]} for i, v in enumerate(norms)},
            "boundary_figure": {
                "images": len(norms), "missing": 0, "mean": sum(figures) / len(figures),
                "median": sorted(figures)[len(figures) // 2],
            },
        }  # fmt: skip
    config = {"budget": budget, "data": {"num_images": 80, "seed": 0}, "seed": 0, "eps_255": 16}
    _write(folder / "results.json", {"config": config, "dataset": {"images": 80}, "models": models})


def test_decision_merges_runs_made_for_different_targets(tmp_path: Path) -> None:
    _query_run(tmp_path / "boundary-standard-s0+defective-s0",
               {"standard-s0": [1.0, 2.0, 3.0], "defective-s0": [2.0, 4.0, 6.0]})  # fmt: skip
    _query_run(tmp_path / "boundary-control-s0", {"control-s0": [1.0, 1.0, 1.0]})
    res = cc.decision(tmp_path)["boundary"]
    assert set(res["models"]) == {"standard-s0", "defective-s0", "control-s0"}
    assert res["ratios"]["defective-s0/standard-s0 mean"]["value"] == pytest.approx(4.0)
    assert res["ratios"]["defective-s0/control-s0 mean"]["value"] == pytest.approx(56 / 3)


def test_decision_refuses_runs_that_differ_or_repeat_a_target(tmp_path: Path) -> None:
    _query_run(tmp_path / "boundary-standard-s0", {"standard-s0": [1.0, 2.0]})
    _query_run(tmp_path / "boundary-control-s0", {"control-s0": [1.0, 2.0]}, budget=200)
    with pytest.raises(SystemExit, match="other settings"):
        cc.decision(tmp_path)
    _query_run(tmp_path / "boundary-control-s0", {"standard-s0": [1.0, 2.0]})
    with pytest.raises(SystemExit, match="two boundary runs"):
        cc.decision(tmp_path)
