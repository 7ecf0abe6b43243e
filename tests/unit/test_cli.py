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
from defcnn.digest import sha256_file

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
    assert scores["checkpoint_sha256"] == {"run": sha256_file(out / "model.safetensors")}
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


@pytest.mark.parametrize(
    "flag", ["--grace-seconds", "--drain-quiet-seconds", "--max-queue-size", "--max-batch-size"]
)
def test_serve_refuses_negative_limits_before_starting(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model-repo", str(tmp_path), flag, "-1"]) == EXIT_USAGE
    assert flag in capsys.readouterr().err


def test_module_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "defcnn.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "train" in done.stdout and "evaluate" in done.stdout


def test_unwritable_output_folders_get_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ckpt = tmp_path / "run" / "model.safetensors"
    assert (
        main(["train", *SMALL, "--epochs", "1", "--max-steps", "1", "--out", str(ckpt.parent)]) == 0
    )
    capsys.readouterr()
    bad = str(blocker / "sub")
    for argv in (
        ["train", *SMALL, "--epochs", "1", "--max-steps", "1", "--out", bad],
        ["evaluate", str(ckpt), "--num-images", "8", "--out", f"{bad}/eval.json"],
        ["export", str(ckpt), "--repo", bad, "--name", "m"],
        ["attack", "transfer", "--url", "127.0.0.1:9", "--model", "m", "--surrogate", str(ckpt),
         "--attack", "fgsm", "--out", bad, "--quiet"],
        ["demo", "--out", bad, "--quiet"],
    ):  # fmt: skip
        assert main(argv) == EXIT_ERROR, argv
        err = capsys.readouterr().err
        assert err.startswith(f"defcnn {argv[0]}: error: Not a directory: "), err
        assert "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_a_failed_final_save_leaves_the_last_checkpoint_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--epochs", "2", "--max-steps", "3", "--out", str(out)]
    assert main(argv) == 0
    before = load_checkpoint(out / "checkpoint-last.safetensors").meta["step"]
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").mkdir()  # something in the way of the final write
    argv = ["train", *SMALL, "--epochs", "2", "--max-steps", "6", "--out", str(out), "--resume"]
    assert main(argv) == EXIT_ERROR
    assert "error" in capsys.readouterr().err
    last = load_checkpoint(out / "checkpoint-last.safetensors")  # loads: not corrupted
    assert last.meta["step"] >= before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no debris


def test_version_prints_the_installed_distribution_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"defcnn {version('defective-cnn')}"


def test_python_dash_m_defcnn_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "defcnn", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("defcnn ")
    done = subprocess.run(
        [sys.executable, "-m", "defcnn", "train"], capture_output=True, text=True, check=False
    )
    assert done.returncode == EXIT_USAGE and "--out" in done.stderr


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["train"], "(default: resnet18)"),
        (["evaluate"], "(default: 512)"),
        (["export"], "(default: 64)"),
        (["serve"], "(default: info)"),
        (["attack", "transfer"], "(default: 100)"),
        (["attack", "query"], "(default: 1000)"),
        (["classify"], "(default: 30.0)"),
        (["demo"], "(default: fgsm pgd mifgsm)"),
        (["bench", "soak"], "(default: 64)"),
    ],
)
def test_every_help_shows_the_defaults(
    argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert shown in text
    # nothing to show is not shown: no None, no bare flag's False, no Python list text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [" not in text and "(default: default" not in text


@pytest.mark.parametrize("level", ["DEBUG", "debug", "Warning"])
def test_serve_log_level_is_case_insensitive(level: str) -> None:
    from defcnn.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-repo", "r", "--log-level", level])
    assert args.log_level == level.lower()


def test_serve_refuses_an_unknown_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model-repo", "r", "--log-level", "loud"])
    assert exc.value.code == EXIT_USAGE
    assert "--log-level" in capsys.readouterr().err


def test_the_servers_logging_takes_a_lower_case_level() -> None:
    script = (
        "import logging; from defcnn.server.app import configure_logging; "
        "configure_logging('debug'); "
        "print(logging.getLogger('defcnn').level, logging.getLogger().level)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    # ours at DEBUG; other libraries stay at INFO (gRPC would log every call)
    assert done.stdout.split() == ["10", "20"]


def test_the_demo_flags_default_to_the_demo_settings() -> None:
    from defcnn.cli import build_parser, demo_settings
    from defcnn.demo.pipeline import DemoSettings

    assert demo_settings(build_parser().parse_args(["demo"])) == DemoSettings()
    assert DemoSettings().dataset == "cifar10-subset"  # the embedded CIFAR-10 subset
