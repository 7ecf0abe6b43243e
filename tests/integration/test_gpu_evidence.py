"""benchmarks/gpu_evidence.py end to end: on the CPU every step that can run here runs (real
training, export, ONNX Runtime, the real server), and every CUDA step says why it did not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_evidence.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_cpu_run_trains_exports_serves_and_records_the_gpu_steps_as_skipped(
    tmp_path: Path,
) -> None:
    out, work = tmp_path / "evidence", tmp_path / "work"
    flags = "--epochs 1 --serve-seconds 0.5 --repeats 2"
    done = _run("--device", "cpu", "--out", str(out), "--work", str(work), *flags.split())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_evidence.json").read_text())
    assert report["finished"] is True
    # The bulky outputs go to --work, the report alone to --out.
    assert (work / "repo" / "defective").is_dir() and (work / "train" / "standard").is_dir()
    assert not (out / "repo").exists() and not (out / "train").exists()
    steps = report["steps"]
    ran = {"machine", "train_speed", "train_run", "export", "ort_throughput", "serve"}
    assert {n for n, s in steps.items() if s["status"] == "ran"} == ran, steps
    assert steps["gpu_parity"]["status"] == "skipped"
    assert steps["gpu_parity"]["reason"].startswith("no CUDA device")
    assert steps["tensorrt"]["status"] == "skipped" and steps["tensorrt"]["reason"]

    speed = steps["train_speed"]["result"]
    assert set(speed["rows"]) == {"standard eager", "defective eager"}
    for row in (*speed["rows"].values(), *steps["ort_throughput"]["result"]["rows"]):
        low, high = row["images_per_second_range"]
        assert 0 < low <= row["images_per_second"] <= high
    assert speed["bf16_autocast"] is False  # autocast is a CUDA setting; never claimed here
    run = steps["train_run"]["result"]
    for kind in ("standard", "defective"):
        assert [e["epoch"] for e in run[kind]["epochs"]] == [1]
        epoch = run[kind]["epochs"][0]
        low, high = epoch["test_accuracy_95"]
        assert 0.0 <= low <= epoch["test_accuracy"] <= high <= 1.0 and low < high
        assert run[kind]["config"]["dataset"] == "digits"
        assert run[kind]["config"]["defective"] is (kind == "defective")
    assert steps["export"]["result"]["defective"]["masks"] > 0
    assert steps["export"]["result"]["standard"]["masks"] == 0
    ort_rows = steps["ort_throughput"]["result"]["rows"]
    assert steps["ort_throughput"]["result"]["provider"] == "CPUExecutionProvider"
    assert sorted({r["batch"] for r in ort_rows}) == [1, 16, 64, 256]
    served = steps["serve"]["result"]
    assert sorted(int(c) for c in served["points"]) == [1, 16, 64]
    assert served["wrong_answers"] == 0
    assert all(p["requests"] > 0 for p in served["points"].values())
    # Goals are GPU goals: on the CPU each says it was not measured there, never "met".
    assert report["goals"]
    assert all(g["verdict"].startswith("not measured") for g in report["goals"])

    text = (out / "gpu_evidence.md").read_text()
    assert "skipped: no CUDA device" in text
    assert "| defcnn serve under closed-loop clients | ran |" in text
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    assert len(report["plots"]) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine reports")
def test_cuda_asked_for_without_one_skips_every_device_step_says_why_and_fails(
    tmp_path: Path,
) -> None:
    out = tmp_path / "evidence"
    done = _run("--device", "cuda", "--out", str(out), "--data-dir", str(tmp_path), timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "--device cuda, but no GPU figures for: train_speed" in done.stderr
    report = json.loads((out / "gpu_evidence.json").read_text())
    steps = report["steps"]
    assert steps["machine"]["status"] == "ran" and report["finished"] is True
    others = {n: s for n, s in steps.items() if n != "machine"}
    assert all(s["status"] == "skipped" for s in others.values()), others
    for name in ("train_speed", "train_run", "gpu_parity", "ort_throughput", "serve"):
        assert others[name]["reason"].startswith("no CUDA device"), others[name]
    assert others["export"]["reason"] == "needs the training run, which skipped"
    assert all(g["verdict"].startswith("not measured: ") for g in report["goals"])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--device", "tpu"], "invalid choice"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--serve-seconds", "nan"], "--serve-seconds must be a number of seconds"),
        (["--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["--device", "cpu", "--dataset", "bogus"], "invalid choice"),
        (["--device", "cpu", "--dataset", "imagefolder"], "needs --data-dir"),
        (["--device", "cuda"], "--dataset imagefolder needs --data-dir"),
        (["--device", "cpu", "--data-dir", "/"], "embedded: it takes no --data-dir"),
        (["--device", "cpu", "--serve-seconds", "0.01"], "--serve-seconds must be"),
        (["--device", "cpu", "--width", "-1"], "--width must be"),
        (["--device", "cpu", "--work", "/dev/null/x"], "--work /dev/null/x: cannot make it"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    done = _run("--out", str(tmp_path / "new"), *args, timeout=120)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr


def test_a_folder_holding_anything_is_refused_so_nothing_stale_is_reused(tmp_path: Path) -> None:
    (tmp_path / "gpu_evidence.json").write_text("{}")
    done = _run("--device", "cpu", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "not an empty folder" in done.stderr
    assert (tmp_path / "gpu_evidence.json").read_text() == "{}"
