"""benchmarks/_evidence_report.py: the goals of issue 15 judged from step results made up
here, and a report of a run cut short."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _evidence_report import Step, goals, markdown


def _steps(epoch_s: float, ratio: float, c64: float, c1_p50: float, mask: float) -> dict:
    rate = 50_000 / epoch_s
    speed = Step(
        "train_speed",
        "t",
        "ran",
        result={
            "rows": {
                "standard eager": {"images_per_second": rate, "seconds_per_cifar10_epoch": epoch_s}
            },
            "fastest_standard": "standard eager",
            "time_ratio_defective_over_standard": {"eager": ratio},
        },
    )
    served = Step(
        "serve",
        "s",
        "ran",
        result={
            "points": {
                1: {"images_per_second": 900.0, "p50_ms": c1_p50},
                64: {"images_per_second": c64},
            },
            "in_process_best": {"images_per_second": 1000.0, "batch": 256},
            "in_process_batch1": {"latency_ms": 1.0},
        },
    )
    ort = Step(
        "ort_throughput",
        "o",
        "ran",
        result={"latency_ratio_defective_over_standard": {1: 1.01, 16: mask}},
    )
    return {s.name: s for s in (speed, served, ort)}


def _verdicts(device: str, width: float, gpu: str, steps: dict) -> list[str]:
    return [g.verdict for g in goals(device, width, gpu, steps)]


def test_each_goal_is_met_or_not_by_its_own_bound_on_an_h200() -> None:
    good = _steps(epoch_s=4.0, ratio=1.02, c64=850.0, c1_p50=1.9, mask=1.02)
    assert _verdicts("cuda", 1.0, "NVIDIA H200", good) == ["met"] * 5
    bad = _steps(epoch_s=6.0, ratio=1.08, c64=700.0, c1_p50=2.1, mask=1.05)
    assert _verdicts("cuda", 1.0, "NVIDIA H200", bad) == ["not met"] * 5


def test_the_epoch_goal_is_not_judged_off_its_width_or_its_gpu() -> None:
    steps = _steps(epoch_s=3.0, ratio=1.0, c64=900.0, c1_p50=1.0, mask=1.0)
    assert _verdicts("cuda", 0.5, "NVIDIA H200", steps)[0].startswith("not judged: width 0.5")
    assert "this GPU is NVIDIA A100" in _verdicts("cuda", 1.0, "NVIDIA A100", steps)[0]
    assert _verdicts("cuda", 1.0, "NVIDIA A100", steps)[1:] == ["met"] * 4


def test_a_cpu_run_judges_nothing_and_missing_steps_say_why() -> None:
    steps = _steps(epoch_s=3.0, ratio=1.0, c64=900.0, c1_p50=1.0, mask=1.0)
    assert all(v.startswith("not measured on a GPU") for v in _verdicts("cpu", 1.0, "none", steps))
    failed = {"serve": Step("serve", "s", "failed", reason="RuntimeError: boom")}
    verdicts = _verdicts("cuda", 1.0, "NVIDIA H200", failed)
    assert "not measured: RuntimeError: boom" in verdicts
    assert "not measured: the run has not reached it" in verdicts


def test_a_report_of_a_run_cut_short_says_so_and_lists_what_finished() -> None:
    machine = Step(
        "machine",
        "the machine",
        "ran",
        result={
            "cpu": "x",
            "nvidia_smi": "n/a",
            "torch_cuda": None,
            "imported": {},
            "versions": {},
            "onnxruntime_providers": ["CPUExecutionProvider"],
        },
    )
    report: dict[str, Any] = {
        "command": "c",
        "started": "t",
        "seconds": 1.0,
        "seed": 0,
        "plots": [],
        "settings": {"device": "cuda"},
        "finished": False,
        "machine": machine.result,
        "goals": [],
    }
    text = markdown(report, {"machine": machine})
    assert "Cut short or still running" in text
    assert "| the machine | ran |" in text
    assert "A CPU rehearsal" not in text
    report.update(settings={"device": "cpu"}, finished=True)
    text = markdown(report, {"machine": machine})
    assert "A CPU rehearsal" in text and "Cut short" not in text


def test_a_step_is_ran_skipped_or_failed_and_a_failure_keeps_its_figures() -> None:
    from gpu_evidence import Failed, Skip, run_step

    def skip() -> dict[str, Any]:
        raise Skip("no CUDA device")

    def wrong() -> dict[str, Any]:
        raise Failed("3 wrong answers", {"wrong_answers": 3})

    def broken() -> dict[str, Any]:
        raise ValueError("bad shape")

    assert run_step("a", "a", lambda: {"x": 1}).status == "ran"
    skipped = run_step("b", "b", skip)
    assert (skipped.status, skipped.reason) == ("skipped", "no CUDA device")
    failed = run_step("c", "c", wrong)
    assert (failed.status, failed.result) == ("failed", {"wrong_answers": 3})
    crashed = run_step("d", "d", broken)
    assert (crashed.status, crashed.reason) == ("failed", "ValueError: bad shape")
