"""`defcnn attack transfer|query` against a real server: report folders, exact query counts,
resume from disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from defcnn.attack.results import QueryResult, TransferResult
from defcnn.cli import main
from defcnn.display import NO_SUCCESS
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.training import TrainConfig, train


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independently trained standard surrogate (another seed, no masks)."""
    out = tmp_path_factory.mktemp("surrogate") / "run"
    cfg = TrainConfig(
        arch="resnet18", width=0.125, dataset="digits", epochs=1, max_steps=20,
        schedule="fast", seed=7, out=str(out),
    )  # fmt: skip
    train(cfg, progress=False)
    return out / "model.safetensors"


def _inference_count(server, model: str = "digits") -> int:
    stats = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return stats.model_stats[0].inference_count


def _assert_readable(text: str) -> None:
    """What people read holds no Python leftovers: no None, no dict or list text."""
    prose = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # Markdown images are fine
    assert "None" not in prose and "{" not in prose and "[" not in prose, text


def _same_json(a: dict, b: dict) -> bool:
    """Equal as results.json text (tuples are lists there, and NaN equals itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_transfer_attack_report_counts_and_resume(
    server, surrogate, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "transfer"
    argv = [
        "attack", "transfer", "--url", server.address, "--model", "digits",
        "--surrogate", str(surrogate), "--attack", "fgsm", "pgd", "--eps", "8", "16",
        "--num-images", "12", "--out", str(out), "--quiet",
    ]  # fmt: skip
    before = _inference_count(server)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "transfer metric" in printed
    _assert_readable(printed)
    results = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "robust_accuracy.png",
                                               "examples.png"}  # fmt: skip
    rows = results["rows"]
    assert {(r["attack"], r["eps_255"]) for r in rows} == {
        ("fgsm", 8.0),
        ("fgsm", 16.0),
        ("pgd", 8.0),
        ("pgd", 16.0),
    }
    for r in rows:
        assert r["images"] == 12
        assert r["mean_linf"] <= r["eps_255"] / 255 + 1e-9  # what was sent stays in the ball
        assert 0.0 <= r["accuracy_adversarial"] <= 1.0
    sent = 12 * (1 + 4) + 1  # clean once, each attack x eps, and the client's label lookup
    assert results["queries"]["digits"]["images"] == sent
    assert _inference_count(server) - before == sent  # the server saw exactly what we counted
    report = (out / "report.md").read_text()
    assert "transfer_accuracy" in report
    assert f"Queries sent: digits {sent} images in " in report
    _assert_readable(report)
    assert _same_json(TransferResult.from_dict(results).to_dict(), results)  # file = type
    assert main(argv) == 0  # a rerun resumes from disk: nothing is crafted or sent again
    assert _inference_count(server) - before == sent


@pytest.mark.parametrize("attack", ["square", "hopskipjump"])
def test_query_attack_report_and_exact_budget(server, tmp_path: Path, attack: str) -> None:
    out = tmp_path / attack
    argv = [
        "attack", "query", "--url", server.address, "--model", "digits", "--attack", attack,
        "--budget", "40", "--eps", "16", "--num-images", "4", "--out", str(out), "--quiet",
    ]  # fmt: skip
    before = _inference_count(server)
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["models"]["digits"]
    assert [r["budget"] for r in entry["by_budget"]] == [10, 40]
    for trace in entry["traces"].values():
        assert trace["queries"] <= 40
    attack_queries = sum(t["queries"] for t in entry["traces"].values())
    assert entry["attacked"] >= 1 and attack_queries > 0
    # the clean pass, the client's one-time label lookup, then every query of the attack
    assert results["queries"]["digits"]["images"] == 4 + 1 + attack_queries
    assert _inference_count(server) - before == 4 + 1 + attack_queries
    if attack == "hopskipjump":
        assert "median_l2" in entry["by_budget"][-1]
    assert (out / "success_vs_queries.png").exists() and (out / "report.md").exists()


def test_a_query_attack_where_nothing_succeeds_reads_as_such(
    server, tmp_path: Path, capsys
) -> None:
    """Budget 1: the attack's only query is the clean image, so no image is fooled and no
    median exists; the console and report.md say so in words."""
    out = tmp_path / "none"
    argv = [
        "attack", "query", "--url", server.address, "--model", "digits", "--attack", "square",
        "--budget", "1", "--num-images", "3", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"median queries {NO_SUCCESS}" in printed
    _assert_readable(printed)
    results = json.loads((out / "results.json").read_text())
    last = results["models"]["digits"]["by_budget"][-1]
    assert last["success_rate"] == 0.0 and last["median_queries"] is None  # JSON null
    report = (out / "report.md").read_text()
    assert f"| {NO_SUCCESS} | {NO_SUCCESS} |" in report  # mean and median queries
    assert "Queries sent: digits " in report
    _assert_readable(report)
    typed = QueryResult.from_dict(results)
    assert _same_json(typed.to_dict(), results)
    assert typed.models["digits"].last.median_queries is None
