"""`defcnn attack transfer|query` against a real server: report folders, exact query counts,
resume from disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from defcnn.attack.results import QueryResult, TransferResult
from defcnn.cli import EXIT_USAGE, main
from defcnn.display import NO_SUCCESS
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.training import TrainConfig, train


def _inference_count(server, model: str = "digits") -> int:
    stats = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return stats.model_stats[0].inference_count


def _assert_readable(text: str) -> None:
    """What people read holds no Python leftovers: no None, no dict or list text."""
    prose = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # Markdown images are fine
    prose = re.sub(r"\[-?[\d.]+, -?[\d.]+\]", "", prose)  # so are intervals and ranges
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
    assert printed.count("endpoint digits") == 1  # the spec, said once
    assert re.search(r"adv \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", printed)  # with its interval
    _assert_readable(printed)
    results = json.loads((out / "results.json").read_text())
    assert results["specs"]["digits"]["output_kind"] == "logits"
    assert results["specs"]["digits"]["height"] == 32
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
        low, high = r["accuracy_adversarial_ci"]
        assert low <= r["accuracy_adversarial"] <= high
        assert r["mean_linf"] <= r["eps_255"] / 255 + 1e-9  # what was sent stays in the ball
        assert 0.0 <= r["accuracy_adversarial"] <= 1.0
    # clean once, each attack x eps, the spec's one probe and the fingerprint's one
    sent = 12 * (1 + 4) + 2
    assert results["queries"]["digits"]["images"] == sent
    assert _inference_count(server) - before == sent  # the server saw exactly what we counted
    report = (out / "report.md").read_text()
    assert "transfer_accuracy" in report
    assert f"Queries sent: digits {sent} images in " in report
    _assert_readable(report)
    assert _same_json(TransferResult.from_dict(results).to_dict(), results)  # file = type
    # A rerun with the same settings resumes from disk: nothing is crafted or sent again
    # but the spec's probe and the fingerprint (to check it is the same endpoint).
    assert main(argv) == 0
    assert _inference_count(server) - before == sent + 2
    again = json.loads((out / "results.json").read_text())
    assert again["queries"]["digits"]["images"] == 2  # this run
    assert again["totals"]["runs"] == 2  # and every run into the folder, together
    assert again["totals"]["queries"]["digits"]["images"] == sent + 2
    assert again["rows"] == rows
    assert "All runs into this folder together: 2 runs" in (out / "report.md").read_text()
    # Images per request change speed, never a result: still the same run, resumed.
    assert main([*argv, "--max-batch-size", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["totals"]["runs"] == 3


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
    # the clean pass, the client's one-time label lookup, the endpoint's fingerprint, then
    # every query of the attack
    assert results["queries"]["digits"]["images"] == 4 + 2 + attack_queries
    assert _inference_count(server) - before == 4 + 2 + attack_queries
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


# ---------------------------------------------------------------- hostile settings


def _query_argv(server, out: Path, *extra: str) -> list[str]:
    return ["attack", "query", "--url", server.address, "--model", "digits", "--num-images", "3",
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def _transfer_argv(server, out: Path, surrogate: Path, *extra: str) -> list[str]:
    return ["attack", "transfer", "--url", server.address, "--model", "digits",
            "--surrogate", str(surrogate), "--attack", "fgsm", "--eps", "8", "--num-images", "4",
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def _error(capsys) -> str:
    """The one line a refused run prints (and no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("defcnn attack: error: ") and "Traceback" not in err, err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("eps", ["0", "300", "-8", "nan"])
@pytest.mark.parametrize("kind", ["query", "transfer"])
def test_an_eps_outside_0_255_is_refused_before_any_query(
    server, surrogate, tmp_path: Path, capsys, eps: str, kind: str
) -> None:
    out = tmp_path / "out"
    if kind == "query":
        argv = _query_argv(server, out, "--attack", "square", "--budget", "5", "--eps", eps)
    else:
        argv = _transfer_argv(server, out, surrogate)
        argv[argv.index("--eps") + 1] = eps
    before = _inference_count(server)
    assert main(argv) == 2
    err = _error(capsys)
    assert ("--eps must be " in err and "(0, 255]" in err) or "finite" in err, err
    assert _inference_count(server) == before  # nothing was sent
    assert not out.exists()  # nor written


def test_a_query_rerun_with_other_settings_is_refused_unless_overwrite(
    server, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    first = _query_argv(server, out, "--attack", "square", "--budget", "100")
    assert main(first) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")  # the user's own file in the folder
    other = _query_argv(server, out, "--attack", "hopskipjump", "--budget", "10", "--eps", "2")
    before = _inference_count(server)
    assert main(other) == 2
    err = _error(capsys)
    for diff in ("attack: square -> hopskipjump", "budget: 100 -> 10", "eps: 16.0 -> 2.0"):
        assert diff in err, err
    assert "--overwrite" in err
    assert _inference_count(server) == before  # refused before any query
    assert json.loads((out / "run.json").read_text())["key"]["attack"] == "square"

    assert main([*other, "--overwrite"]) == 0  # a fresh run replaces the old one's files
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["attack"] == "hopskipjump" and results["config"]["budget"] == 10
    assert results["totals"]["runs"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # and nothing else
    traces = results["models"]["digits"]["traces"].values()
    assert all(t["queries"] <= 10 for t in traces)


def test_transfer_reruns_are_keyed_by_the_surrogates_contents(
    server, surrogate, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "t"
    assert main(_transfer_argv(server, out, surrogate)) == 0
    copy = tmp_path / "elsewhere" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(surrogate.read_bytes())
    before = _inference_count(server)
    assert main(_transfer_argv(server, out, copy)) == 0  # the same file elsewhere: a resume
    assert _inference_count(server) - before == 2  # only the spec's probe and fingerprint
    other = tmp_path / "other.safetensors"
    cfg = TrainConfig(arch="resnet18", width=0.125, dataset="digits", epochs=1, max_steps=2,
                      schedule="fast", seed=8, out=str(tmp_path / "run8"))  # fmt: skip
    train(cfg, progress=False)
    other.write_bytes((tmp_path / "run8" / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main(_transfer_argv(server, out, other)) == 2
    assert "surrogates: sha256 " in _error(capsys)


def test_a_transfer_run_never_writes_into_a_query_folder(
    server, surrogate, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    assert main(_query_argv(server, out, "--attack", "square", "--budget", "3")) == 0
    capsys.readouterr()
    for extra in ((), ("--overwrite",)):
        assert main(_transfer_argv(server, out, surrogate, *extra)) == 2
        assert "holds a query attack run" in _error(capsys)
    assert not (out / "stages").exists()
    assert main(_query_argv(server, out, "--attack", "square", "--budget", "3")) == 0  # intact


def test_config_keys_and_types_are_checked_and_flags_win(server, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"budjet": 5}))
    argv = _query_argv(server, out, "--attack", "square", "--config", str(config))
    assert main(argv) == 2
    err = _error(capsys)
    assert "'budjet'" in err and "did you mean 'budget'" in err
    config.write_text(json.dumps({"budget": "10"}))
    assert main(argv) == 2
    assert "'budget' must be an integer, got a string" in _error(capsys)
    config.write_text(json.dumps({"budget": 0}))
    assert main(argv) == 2
    assert "--budget must be a whole number >= 1, got 0" in _error(capsys)
    config.write_text(json.dumps({"budget": 50, "num_classes": 10, "eps": 8}))
    assert main([*argv, "--budget", "4"]) == 0  # the flag wins; underscores read as dashes
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["budget"], cfg["spec"]["num_classes"], cfg["eps_255"]) == (4, 10, 8.0)


def test_a_score_attack_on_a_label_only_endpoint_names_the_attacks_that_fit(
    repo, foreign, surrogate, tmp_path: Path, capsys
) -> None:
    labels_only = foreign.start(repo.onnx_path, name="digits", output="label")
    argv = ["attack", "query", "--url", labels_only.grpc_url, "--model", "digits",
            "--attack", "square", "--budget", "5", "--num-images", "2", "--num-classes", "10",
            "--out", str(tmp_path / "l"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = _error(capsys)
    assert "square needs scores" in err
    for name in ("hopskipjump", "boundary", "geoda", "signopt"):
        assert name in err
    argv[argv.index("square")] = "hopskipjump"
    assert main(argv) == 0  # a decision-based attack runs on labels alone
    results = json.loads((tmp_path / "l" / "results.json").read_text())
    assert results["specs"]["digits"]["output_kind"] == "label"
    assert results["decision_based"] is True
    transfer = ["attack", "transfer", "--url", labels_only.grpc_url, "--model", "digits",
                "--surrogate", str(surrogate), "--attack", "fgsm", "--num-images", "4",
                "--out", str(tmp_path / "t"), "--quiet"]  # fmt: skip
    assert main(transfer) == 0  # transfer attacks need labels only
    rows = json.loads((tmp_path / "t" / "results.json").read_text())["rows"]
    assert rows[0]["images"] == 4 and 0.0 <= rows[0]["accuracy_adversarial"] <= 1.0


def test_steps_and_step_reach_the_attack(server, surrogate, tmp_path: Path) -> None:
    out = tmp_path / "s"
    argv = _transfer_argv(server, out, surrogate, "--steps", "3", "--step", "2")
    argv[argv.index("fgsm")] = "pgd"
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["attack_params"]["pgd"]["steps"] == 3
    assert results["attack_params"]["pgd"]["step"] == pytest.approx(2 / 255)
    assert (results["config"]["steps"], results["config"]["step_255"]) == (3, 2.0)
    assert "pgd steps 3" in (out / "report.md").read_text()
    key = json.loads((out / "run.json").read_text())["key"]
    assert key["params"]["pgd"]["steps"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--step", "9"), "--step must be in (0, eps]"),
        (("--steps", "0"), "--steps must be a whole number >= 1"),
        (("--layout", "nchw"), "expected one of NCHW, NHWC"),
        (("--input-range", "1,0"), "--input-range LO,HI needs LO < HI"),
        (("--dataset", "cifar100"), "did you mean 'cifar10'"),
        (("--label-map", "/nonexistent.json"), "cannot read --label-map"),
        (("--num-images", "0"), "--num-images must be a whole number >= 1"),
    ],
)
def test_bad_transfer_settings_are_one_line_errors(
    server, surrogate, tmp_path: Path, capsys, extra: tuple[str, ...], message: str
) -> None:
    argv = _transfer_argv(server, tmp_path / "x", surrogate, *extra)
    argv[argv.index("fgsm")] = "pgd"
    before = _inference_count(server)
    assert main(argv) == 2
    assert message in _error(capsys)
    assert _inference_count(server) == before


def test_a_missing_surrogate_is_named(server, tmp_path: Path, capsys) -> None:
    assert main(_transfer_argv(server, tmp_path / "x", tmp_path / "none.safetensors")) == 2
    assert "--surrogate" in _error(capsys)


def test_a_resume_follows_the_model_not_the_address(
    server, repo, launch, surrogate, tmp_path: Path, capsys
) -> None:
    """The same model on a new port resumes; a model swapped behind the same name and spec
    is another run, refused (its answers differ), not a stale resume."""
    out = tmp_path / "t"
    assert main(_transfer_argv(server, out, surrogate)) == 0
    moved_repo = tmp_path / "moved"
    shutil.copytree(repo.root / "digits", moved_repo / "digits")
    moved = launch.start(moved_repo)
    try:
        assert main(_transfer_argv(moved, out, surrogate)) == 0
        assert json.loads((out / "results.json").read_text())["totals"]["runs"] == 2
    finally:
        moved.stop()
    swapped_repo = tmp_path / "swapped"
    shutil.copytree(repo.root / "digits", swapped_repo / "digits")
    graph = onnx.load(swapped_repo / "digits" / "1" / "model.onnx")
    bias = next(t for t in graph.graph.initializer if tuple(t.dims) == (10,))  # the head's
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 5.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(graph, swapped_repo / "digits" / "1" / "model.onnx")
    swapped = launch.start(swapped_repo)
    try:
        capsys.readouterr()
        assert main(_transfer_argv(swapped, out, surrogate)) == EXIT_USAGE
        assert "answers" in _error(capsys)
    finally:
        swapped.stop()


def _permuted_repo(repo, root: Path, perm: list[int], names: list[str]) -> Path:
    """The suite's model with its classes reordered: endpoint index k is the original class
    perm[k] (the head's rows permuted), named names[k] in labels.txt."""
    shutil.copytree(repo.root / "digits", root / "digits")
    path = root / "digits" / "1" / "model.onnx"
    graph = onnx.load(path)
    for t in graph.graph.initializer:
        if tuple(t.dims)[:1] == (10,) and len(t.dims) in (1, 2):  # the head's bias and weight
            values = onnx.numpy_helper.to_array(t)[perm]
            t.CopyFrom(onnx.numpy_helper.from_array(values, t.name))
    onnx.save(graph, path)
    (root / "digits" / "labels.txt").write_text("\n".join(names) + "\n")
    return root


def test_classes_in_another_order_are_mapped_not_misread(
    server, repo, launch, surrogate, tmp_path: Path, capsys
) -> None:
    """An endpoint whose classes are the data set's in another order: mapped by name (or by
    --label-map when its names differ), and the numbers equal those of the original order;
    unmapped different names are refused rather than scored against the wrong class."""
    perm = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    argv = ("--attack", "fgsm", "pgd", "--eps", "16")
    assert main(_transfer_argv(server, tmp_path / "ours", surrogate, *argv)) == 0
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["rows"]

    def rates(rows: list[dict]) -> list[tuple]:
        return [(r["attack"], r["accuracy_clean"], r["accuracy_adversarial"]) for r in rows]

    by_name = launch.start(_permuted_repo(repo, tmp_path / "a", perm, [str(c) for c in perm]))
    try:
        capsys.readouterr()
        assert main(_transfer_argv(by_name, tmp_path / "by-name", surrogate, *argv)) == 0
        assert "label map by class name" in capsys.readouterr().out
    finally:
        by_name.stop()
    got = json.loads((tmp_path / "by-name" / "results.json").read_text())["rows"]
    assert rates(got) == rates(ours)

    renamed = launch.start(_permuted_repo(repo, tmp_path / "b", perm, list("abcdefghij")))
    try:
        capsys.readouterr()
        assert main(_transfer_argv(renamed, tmp_path / "refused", surrogate, *argv)) == EXIT_USAGE
        assert "--label-map" in _error(capsys)
        mapping = tmp_path / "map.json"  # data set class c -> the endpoint index holding it
        mapping.write_text(json.dumps([perm.index(c) for c in range(10)]))
        out = tmp_path / "mapped"
        assert (
            main(_transfer_argv(renamed, out, surrogate, *argv, "--label-map", str(mapping))) == 0
        )
    finally:
        renamed.stop()
    assert rates(json.loads((out / "results.json").read_text())["rows"]) == rates(ours)


def test_an_endpoint_of_another_size_gets_the_images_resized_once(
    launch, surrogate, tmp_path: Path, capsys
) -> None:
    """A 24x24 endpoint: the 32x32 data set images are resized once (said once), attacked at
    24x24, and the clean accuracy is the endpoint's own on those resized images."""
    from defcnn.client import InferenceClient
    from defcnn.data import load_dataset
    from defcnn.data._resize import resize_uint8
    from defcnn.export.exporter import ExportSettings, export

    run = tmp_path / "run24"
    train(TrainConfig(arch="resnet18", width=0.125, dataset="digits", image_size=24, epochs=1,
                      max_steps=20, schedule="fast", out=str(run)), progress=False)  # fmt: skip
    export(ExportSettings(checkpoint=str(run / "model.safetensors"), repo=str(tmp_path / "r"),
                          name="digits", max_batch_size=16))  # fmt: skip
    small = launch.start(tmp_path / "r")
    out = tmp_path / "out"
    try:
        capsys.readouterr()
        assert main(_transfer_argv(small, out, surrogate)) == 0
        printed = capsys.readouterr().out
        assert printed.count("to the endpoint's 24x24") == 1
        results = json.loads((out / "results.json").read_text())
        assert (results["specs"]["digits"]["height"], results["specs"]["digits"]["width"]) == (
            24, 24,
        )  # fmt: skip
        data = load_dataset("digits", progress=False)
        x = resize_uint8(data.test_x[results["dataset"]["indices"]], 24)
        with InferenceClient(small.address) as client:
            right = (
                client.labels("digits", x.astype(np.float32) / 255)
                == data.test_y[results["dataset"]["indices"]]
            )
    finally:
        small.stop()
    assert all(r["accuracy_clean"] == float(right.mean()) for r in results["rows"])
    assert all(np.load(p).shape[2:] == (24, 24) for p in (out / "stages").glob("adv-*.npy"))
