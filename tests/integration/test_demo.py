"""`defcnn demo` end to end on the embedded digits: every stage's output, the side-by-side
table, resume from the run folder, and the server stopped however the demo ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defcnn.cli import EXIT_INTERRUPTED, EXIT_USAGE, main

pytestmark = pytest.mark.slow

TINY = ["--dataset", "digits", "--width", "0.125", "--epochs", "1", "--attack", "fgsm",
        "--eps", "16", "--num-images", "16", "--budget", "20", "--query-images", "4",
        "--quiet"]  # fmt: skip


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One complete tiny demo run: its folder and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "defcnn.cli", "demo", "--out", str(out), *TINY],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_demo_runs_every_stage_and_prints_the_comparison(finished: tuple[Path, str]) -> None:
    out, stdout = finished
    for i in range(1, 6):
        assert f"[{i}/5]" in stdout
    assert "| transfer FGSM 16/255 | accuracy under attack |" in stdout
    assert "| query square (20 queries/image) | success rate |" in stdout
    summary_md = (out / "summary.md").read_text()
    for text in (stdout, summary_md):  # what people read: no Python None or dict text
        assert "None" not in text and "{" not in text and "nan" not in text
    for name in ("standard", "defective", "surrogate"):
        assert (out / "models" / name / "model.safetensors").exists()
    for name in ("standard", "defective"):
        assert (out / "repo" / name / "1" / "model.onnx").exists()
    defective = json.loads((out / "models" / "defective" / "config.json").read_text())
    standard = json.loads((out / "models" / "standard" / "config.json").read_text())
    surrogate = json.loads((out / "models" / "surrogate" / "config.json").read_text())
    assert defective["defective"] and defective["keep_prob"] == 0.1
    assert not surrogate["defective"] and surrogate["seed"] == 1  # independently trained
    # the standard target, same seed, stops at the defective one's accuracy (less 1 point)
    metrics = {m: json.loads((out / "models" / m / "metrics.json").read_text())
               for m in ("standard", "defective")}  # fmt: skip
    assert standard["seed"] == defective["seed"] and not standard["defective"]
    target = round(metrics["defective"]["test_accuracy"] - 0.01, 4)
    assert standard["stop_at_accuracy"] == pytest.approx(max(0.01, target))
    assert standard["eval_every"] == max(1, 45 // 10)  # digits: 45 steps an epoch
    reached = metrics["standard"]["test_accuracy"] >= standard["stop_at_accuracy"]
    if metrics["standard"]["stopped_at_step"] is None:  # trained all its epochs, short of it
        assert not reached and metrics["standard"]["steps"] == 45
    else:  # stopped at a check (every eval_every steps, and at the epoch's end)
        step = metrics["standard"]["stopped_at_step"]
        assert reached and (step % standard["eval_every"] == 0 or step == 45)
    summary = json.loads((out / "summary.json").read_text())
    transfer = json.loads((out / "transfer" / "results.json").read_text())
    query = json.loads((out / "query" / "results.json").read_text())
    assert {r["target"] for r in transfer["rows"]} == {"standard", "defective"}
    assert set(query["models"]) == {"standard", "defective"}
    # the table's numbers are the reports' numbers
    rows = {(r["setting"], r["measure"]): r for r in summary["rows"]}
    under = rows[("transfer FGSM 16/255", "accuracy under attack")]
    for r in transfer["rows"]:
        assert under[r["target"]] == pytest.approx(r["accuracy_adversarial"])
        assert under[f"{r['target']}_ci"] == pytest.approx(r["accuracy_adversarial_ci"])
    low, high = under["difference_ci"]
    assert low <= under["defective"] - under["standard"] == under["difference"] <= high
    clean = rows[("clean", "test accuracy (whole test split)")]
    assert clean["standard"] == pytest.approx(metrics["standard"]["test_accuracy"])
    assert summary["matched"] == (abs(clean["difference"]) <= 0.02)
    # the verdict: a tally that adds up, and the words for what the intervals allow
    tally = summary["transfer_tally"]
    assert sum(tally.values()) == 1
    assert "comparable" in stdout and "ties (the difference's interval holds zero)" in stdout
    rate = rows[("query square (20 queries/image)", "success rate")]
    for m, entry in query["models"].items():
        assert rate[m] == entry["by_budget"][-1]["success_rate"]
    assert summary["queries"]["standard"] == (
        transfer["queries"]["standard"]["images"] + query["queries"]["standard"]["images"]
    )
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "| setting | measure | standard [95% CI] | defective [95% CI] |" in summary_md
    server = json.loads((out / "server.json").read_text())
    assert not _alive(server["pid"])  # the demo stopped the server it started


def test_a_rerun_reuses_every_stage(finished: tuple[Path, str], capsys) -> None:
    out, _ = finished
    model = out / "models" / "standard" / "model.safetensors"
    before = model.stat().st_mtime_ns
    summary_before = json.loads((out / "summary.json").read_text())
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 5  # three models, two exports
    assert model.stat().st_mtime_ns == before
    after = json.loads((out / "summary.json").read_text())
    assert after["rows"] == summary_before["rows"]  # the attacks were resumed from disk


def test_other_training_settings_in_the_same_folder_are_refused(
    finished: tuple[Path, str], capsys
) -> None:
    out, _ = finished
    argv = ["demo", "--out", str(out), *TINY, "--keep-prob", "0.5"]
    assert main(argv) == EXIT_USAGE
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_server_is_stopped_when_the_demo_is_interrupted(
    finished: tuple[Path, str], tmp_path: Path, how: signal.Signals
) -> None:
    trained, _ = finished
    out = tmp_path / "run"
    for part in ("models", "repo"):  # trained already: the demo goes straight to serving
        shutil.copytree(trained / part, out / part)
    shutil.copy(trained / "exported.json", out / "exported.json")
    long = [*TINY, "--budget", "100000", "--query-images", "50", "--attack", "pgd"]
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:  # a file, not a pipe: an unread pipe could block the demo
        proc = subprocess.Popen(
            [sys.executable, "-m", "defcnn.cli", "demo", "--out", str(out), *long],
            stdout=subprocess.DEVNULL, stderr=sink,
            # a test run started in the background has SIGINT ignored, and children inherit
            # that; the demo must see Ctrl-C as a terminal would deliver it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "server.json").exists():
        assert proc.poll() is None, errors.read_text()
        assert time.monotonic() < deadline, "the demo never started its server"
        time.sleep(0.1)
    pid = json.loads((out / "server.json").read_text())["pid"]
    assert _alive(pid)
    while not (out / "transfer" / "stages").exists():  # into the attack stage
        assert proc.poll() is None, errors.read_text()
        assert time.monotonic() < deadline, "the demo never started attacking"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, how)

    def story() -> str:  # what the demo and its server said, for a failure message
        log = out / "server.log"
        server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return f"demo stderr:\n{errors.read_text()[-3000:]}\nserver log:\n{server_log}"

    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the demo was still running 60 s after {how.name}\n{story()}")
    if how == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == EXIT_INTERRUPTED, story()
        assert "interrupted" in errors.read_text(), story()
    assert _wait_gone(pid), f"the server outlived the demo\n{story()}"


def test_samples_larger_than_the_test_split_are_refused_before_training(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), *TINY, "--num-images", "360"]) == EXIT_USAGE
    assert "--num-images 360 is more than the 359 test images of digits" in capsys.readouterr().err
    assert not (out / "models").exists()  # nothing was trained


def test_an_export_of_another_checkpoint_is_not_reused(
    finished: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    trained, _ = finished
    out = tmp_path / "run"
    for part in ("models", "repo"):
        shutil.copytree(trained / part, out / part)
    shutil.copy(trained / "exported.json", out / "exported.json")
    ckpt = out / "models" / "defective" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes() + b" ")  # a checkpoint the export was not made from
    assert main(["demo", "--out", str(out), *TINY]) == EXIT_USAGE
    assert "exported from another checkpoint" in capsys.readouterr().err
