"""The `defcnn` command: train and evaluate end to end, and clear exit codes on bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from defcnn.checkpoint import load_checkpoint
from defcnn.cli import EXIT_ERROR, EXIT_USAGE, main
from defcnn.data import load_dataset

SMALL = ["--arch", "resnet18", "--width", "0.125", "--dataset", "digits", "--quiet"]


def test_train_then_evaluate_reports_the_same_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--defective", "--epochs", "1", "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-last.safetensors", "config.json", "metrics.json", "model.safetensors",
    ]  # fmt: skip
    assert json.loads((out / "config.json").read_text())["batch_size"] == 32
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(out / "model.safetensors"), "--dataset", "digits", "--out", str(report)]
    assert main(argv) == 0
    assert "| clean | - | " in capsys.readouterr().out
    scores = json.loads(report.read_text())
    assert scores["images"] == len(load_dataset("digits", progress=False).test_y)
    assert [r["corruption"] for r in scores["rows"]] == ["clean"]
    assert scores["rows"][0]["run"] == pytest.approx(trained["test_accuracy"])
    meta = load_checkpoint(out / "model.safetensors").meta
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert {"torch", "python"} <= set(meta["versions"])


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--keep-prob", "0", "--out", "x"],
        ["train", "--keep-prob", "1.5", "--out", "x"],
        ["train", "--arch", "alexnet", "--out", "x"],
        ["train", "--dataset", "mnist", "--out", "x"],
        ["train"],  # --out is required
    ],
)
def test_bad_arguments_exit_with_usage_code(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE


def test_bad_settings_and_files_get_a_message_and_an_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", *SMALL, "--stages", "layer9", "--defective", "--out", str(tmp_path)])
    assert code == EXIT_USAGE
    assert "stages" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.safetensors")]) == EXIT_ERROR
    assert "not found" in capsys.readouterr().err
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    assert main(["evaluate", str(evil)]) == EXIT_ERROR
    assert "refused" in capsys.readouterr().err
    code = main(
        [
            "train",
            *SMALL,
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == EXIT_ERROR
    assert "--download" in capsys.readouterr().err


def test_module_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "defcnn.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "train" in done.stdout and "evaluate" in done.stdout
