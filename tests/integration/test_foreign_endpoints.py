"""`defcnn attack` against endpoints that are not ours: a KServe ModelServer (a real third-party
server, tests/integration/foreign_server.py) serving the suite's network under other
conventions, over gRPC and REST, with no flags beyond --url and --model where its metadata
says enough (a label-only endpoint's metadata cannot say how many classes: --num-classes).

- "uint8": UINT8 NHWC [-1, 32, 32, 3] input `image` (pixels 0..255), softmax output
  `probabilities`;
- "probs": FP32 NCHW input, softmax output `probabilities`;
- "label": FP32 NCHW input, INT64 [N] output `label` (the argmax: labels only).

All wrap the ONNX file `defcnn serve` serves (the same weights), so the numbers measured
through them must equal ours on the same images:
- transfer attacks: clean and adversarial accuracy, to the image, through every endpoint
  (the crafted images are uint8, so the UINT8 endpoint is sent exactly the pixels ours is
  sent as k/255 floats; the test checks what it received);
- a decision-based query attack (HopSkipJump) through the label-only endpoint: every
  image's trace, as it is deterministic for a seed given the labels;
- a score-based one (Square) through the probabilities endpoint: every trace, because the
  attack is given probabilities either way (ours through the same float32 softmax).
  Through the UINT8 endpoint Square's numbers need not be ours: its candidates are rounded
  to uint8 levels before they are sent (ours get floats up to 1.5e-5/255 off the levels), so
  candidates that differ as floats but round alike are one query there and two here, and
  query counts differ (on this suite's model: 94 against 98 for one unfooled image), and
  with them, in general, the query at which an image is first fooled. There the test checks
  what was sent (uint8 levels inside the eps-ball, as many as counted), and that gRPC and
  REST give the same traces.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defcnn.cli import EXIT_USAGE, main
from defcnn.client import InferenceClient
from defcnn.data import load_dataset

pytestmark = pytest.mark.slow

MODEL = "digits"
TRANSPORTS = ("grpc", "rest")


@dataclass
class Foreign:
    """The module's KServe endpoints by kind, and where the UINT8 one records what it is
    sent (one .npy file per request, numbered in arrival order)."""

    servers: dict[str, Any]  # kind -> conftest.ForeignServer
    received: Path

    def url(self, kind: str, transport: str) -> str:
        server = self.servers[kind]
        return str(server.grpc_url if transport == "grpc" else server.rest_url)

    def received_since(self, before: set[Path]) -> list[np.ndarray]:
        return [np.load(p) for p in sorted(set(self.received.iterdir()) - before)]


@pytest.fixture(scope="module")
def endpoints(foreign, repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Foreign]:
    received = tmp_path_factory.mktemp("received")
    options: dict[str, dict[str, str]] = {
        "uint8": {"datatype": "UINT8", "layout": "NHWC", "output": "probabilities",
                  "input_name": "image", "output_name": "probabilities",
                  "record_dir": str(received)},
        "probs": {"output": "probabilities", "output_name": "probabilities"},
        "label": {"output": "label", "output_name": "label"},
    }  # fmt: skip
    servers: dict[str, Any] = {}
    try:
        for kind, opts in options.items():
            servers[kind] = foreign.start(repo.onnx_path, name=MODEL, **opts)
        yield Foreign(servers, received)
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def server(launch, repo) -> Iterator[Any]:
    """`defcnn serve` on ONNX Runtime's CPU provider, as the KServe endpoints run it: on a
    machine with a GPU `--device auto` would use CUDA, whose logits differ in the last bits,
    and HopSkipJump's binary searches end where a last bit can change a label."""
    srv = launch.start(repo.root, "--device", "cpu", "--max-queue-delay-us", "5000")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module", autouse=True)
def _craft_on_the_cpu() -> Iterator[None]:
    """Every run crafts the same images only if crafting is deterministic: on the CPU it is
    (cuDNN's backward passes need not be). Module-scoped, so that it holds for the module's
    baseline runs too."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


def _digits(n: int, seed: int = 0) -> np.ndarray:
    """`n` test images of the digits set, float32 NCHW in [0, 1] (on uint8 levels)."""
    data = load_dataset("digits", None, progress=False)
    idx = np.random.default_rng(seed).choice(len(data.test_y), n, replace=False)
    return data.test_x[idx].astype(np.float32) / 255


UINT8_NHWC_PROBABILITIES = ("UINT8", "NHWC", "probabilities")


def _convention(spec: dict[str, Any]) -> tuple[str, str, str]:
    """What results.json says the endpoint takes and gives."""
    return spec["datatype"], spec["layout"], spec["output_kind"]


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------- client level


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_specs_come_from_metadata_alone(endpoints: Foreign, transport: str) -> None:
    with InferenceClient(endpoints.url("uint8", transport)) as client:
        spec = client.spec(MODEL)
    assert (spec.input_name, spec.datatype, spec.layout) == ("image", "UINT8", "NHWC")
    assert (spec.height, spec.width, spec.input_range) == (32, 32, (0.0, 255.0))
    assert (spec.output_name, spec.output_kind) == ("probabilities", "probabilities")
    assert spec.num_classes == 10
    with InferenceClient(endpoints.url("label", transport)) as client:
        spec = client.spec(MODEL)
    assert (spec.datatype, spec.layout, spec.output_name) == ("FP32", "NCHW", "label")
    assert spec.output_kind == "label" and not spec.score_based
    assert spec.num_classes is None  # KServe's metadata cannot say: --num-classes for queries


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_foreign_labels_equal_ours(server, endpoints: Foreign, transport: str) -> None:
    """Digits and noise (whose classes are closer calls): the same labels through all three."""
    x = np.concatenate([_digits(24), np.random.default_rng(1).random((8, 3, 32, 32))])
    x = (np.rint(x * 255) / 255).astype(np.float32)  # on uint8 levels: the same for all
    with InferenceClient(server.address) as ours:
        expected = ours.labels(MODEL, x)
    for kind in endpoints.servers:
        with InferenceClient(endpoints.url(kind, transport)) as client:
            np.testing.assert_array_equal(client.labels(MODEL, x), expected, err_msg=kind)
    with InferenceClient(endpoints.url("uint8", transport)) as client:
        probabilities = client.scores(MODEL, x)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- transfer attacks

TRANSFER = ("--attack", "fgsm", "pgd", "--eps", "8", "16", "--num-images", "24", "--seed", "3")


def _transfer(url: str, out: Path, surrogate: Path) -> dict[str, Any]:
    argv = ["attack", "transfer", "--url", url, "--model", MODEL, "--surrogate", str(surrogate),
            *TRANSFER, "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return _results(out)


@pytest.fixture(scope="module")
def ours_transfer(server, surrogate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transfer run against `defcnn serve` (FP32 NCHW logits), the baseline."""
    out = tmp_path_factory.mktemp("ours") / "transfer"
    _transfer(server.address, out, surrogate)
    return out


def _stages(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted((out / "stages").glob("*.npy"))}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["uint8", "label"])
def test_transfer_numbers_equal_ours(
    ours_transfer: Path, endpoints: Foreign, surrogate: Path, tmp_path: Path, kind: str,
    transport: str,
) -> None:  # fmt: skip
    before = set(endpoints.received.iterdir())
    out = tmp_path / "transfer"
    theirs = _transfer(endpoints.url(kind, transport), out, surrogate)
    ours = _results(ours_transfer)
    # The same images crafted, the same label for each of them, so the same rows: clean
    # accuracy and accuracy under each attack and eps, to the image.
    mine, baseline = _stages(out), _stages(ours_transfer)
    assert sorted(mine) == sorted(baseline)
    for name, array in baseline.items():
        np.testing.assert_array_equal(mine[name], array, err_msg=name)
    assert theirs["rows"] == ours["rows"]
    assert len(theirs["rows"]) == 4 and all(r["images"] == 24 for r in theirs["rows"])
    spec = theirs["specs"][MODEL]
    if kind == "uint8":
        assert _convention(spec) == UINT8_NHWC_PROBABILITIES
        assert (spec["input_name"], spec["output_name"]) == ("image", "probabilities")
        _assert_sent_exactly(endpoints.received_since(before), out, theirs)
    else:
        assert (spec["datatype"], spec["output_kind"]) == ("FP32", "label")
    assert ours["specs"][MODEL]["output_kind"] == "logits"


def _assert_sent_exactly(received: list[np.ndarray], out: Path, results: dict[str, Any]) -> None:
    """Uint8 rounding happens in the sent pixel space: the UINT8 endpoint received exactly
    the data set's uint8 images and the crafted uint8 images (which ours got as k/255
    floats), each once, and the fingerprint's probe besides (this endpoint's metadata says
    UINT8 and probabilities are found by the fingerprint's answer: no spec probe)."""
    assert all(r.dtype == np.uint8 and r.shape[1:] == (32, 32, 3) for r in received)
    sent = Counter(row.transpose(2, 0, 1).tobytes() for r in received for row in r)
    data = load_dataset("digits", None, progress=False)
    clean = data.test_x[results["dataset"]["indices"]]
    crafted = [np.load(p) for p in sorted((out / "stages").glob("adv-*.npy"))]
    assert len(crafted) == 4 and all(a.dtype == np.uint8 for a in crafted)
    expected = Counter(row.tobytes() for batch in (clean, *crafted) for row in batch)
    assert not expected - sent  # every image, exactly as crafted
    assert (sent - expected).total() == 2  # and the two probes


# ---------------------------------------------------------------- query attacks


def _query(url: str, out: Path, attack: str, *extra: str) -> dict[str, Any]:
    argv = ["attack", "query", "--url", url, "--model", MODEL, "--attack", attack,
            "--num-images", "4", "--seed", "5", "--out", str(out), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return _results(out)


def _outcome(results: dict[str, Any]) -> dict[str, Any]:
    """What a query run measured, without how many queries the spec cost."""
    entry = results["models"][MODEL]
    return {
        "clean_accuracy": entry["clean_accuracy"],
        "attacked": entry["attacked"],
        "by_budget": entry["by_budget"],
        "traces": entry["traces"],
    }


@pytest.fixture(scope="module")
def ours_decision(server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ours") / "hopskipjump"
    return _query(server.address, out, "hopskipjump", "--budget", "60")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_decision_attack_on_the_label_only_endpoint_equals_ours(
    ours_decision: dict[str, Any], endpoints: Foreign, tmp_path: Path, transport: str
) -> None:
    """HopSkipJump sees only labels, so it is deterministic for a seed given the labels:
    every image's trace (queries, first success, each closer adversarial) is the same."""
    url = endpoints.url("label", transport)
    theirs = _query(url, tmp_path / "q", "hopskipjump", "--budget", "60", "--num-classes", "10")
    assert theirs["decision_based"] is True
    assert theirs["specs"][MODEL]["output_kind"] == "label"
    assert _outcome(theirs) == _outcome(ours_decision)
    assert _outcome(theirs)["attacked"] >= 1


SQUARE = ("--budget", "100", "--eps", "32")


@pytest.fixture(scope="module")
def ours_square(server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ours") / "square"
    return _query(server.address, out, "square", *SQUARE)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_score_attack_on_the_probabilities_endpoint_equals_ours(
    ours_square: dict[str, Any], endpoints: Foreign, tmp_path: Path, transport: str
) -> None:
    theirs = _query(endpoints.url("probs", transport), tmp_path / "q", "square", *SQUARE)
    assert theirs["specs"][MODEL]["output_kind"] == "probabilities"
    assert _outcome(theirs) == _outcome(ours_square)
    rows = _outcome(theirs)["by_budget"]
    assert rows[-1]["success_rate"] > 0  # the attack got somewhere: the traces say something


@pytest.fixture(scope="module")
def uint8_square(
    endpoints: Foreign, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, Any], list[np.ndarray]]]:
    """Square through the UINT8 endpoint on each transport: results and what it received."""
    runs = {}
    for transport in TRANSPORTS:
        before = set(endpoints.received.iterdir())
        out = tmp_path_factory.mktemp("uint8") / transport
        results = _query(endpoints.url("uint8", transport), out, "square", *SQUARE)
        runs[transport] = (results, endpoints.received_since(before))
    return runs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_score_attack_on_the_uint8_endpoint_sends_uint8_levels_inside_the_ball(
    uint8_square: dict[str, tuple[dict[str, Any], list[np.ndarray]]],
    ours_square: dict[str, Any], transport: str,
) -> None:  # fmt: skip
    results, received = uint8_square[transport]
    spec = results["specs"][MODEL]
    assert _convention(spec) == UINT8_NHWC_PROBABILITIES
    entry = results["models"][MODEL]
    assert entry["clean_accuracy"] == ours_square["models"][MODEL]["clean_accuracy"]
    assert all(t["queries"] <= 100 for t in entry["traces"].values())
    # The endpoint saw exactly what the client counted: the probes, the clean pass, the queries.
    images = np.concatenate([r.transpose(0, 3, 1, 2) for r in received]).astype(np.int16)
    assert len(images) == results["queries"][MODEL]["images"]
    queries = sum(t["queries"] for t in entry["traces"].values())
    assert len(images) == 2 + 4 + queries
    # Every attack query is within eps (32 levels) of its clean image, as sent: rounding to
    # uint8 happened before the ball was checked, not after.
    data = load_dataset("digits", None, progress=False)
    clean = data.test_x[results["dataset"]["indices"]].astype(np.int16)
    attacked = clean[[int(i) for i in entry["traces"]]]
    distance = np.abs(images[:, None] - attacked[None]).max(axis=(2, 3, 4))  # [sent, clean]
    assert int((distance.min(axis=1) <= 32).sum()) >= len(images) - 2  # all but the probes
    for trace in entry["traces"].values():
        if trace["first_success"] is not None:
            assert trace["best_label"] is not None


def test_a_score_attack_on_the_uint8_endpoint_is_the_same_over_grpc_and_rest(
    uint8_square: dict[str, tuple[dict[str, Any], list[np.ndarray]]],
) -> None:
    """Not ours (see the module's docstring), but deterministic: the same on both transports,
    query for query."""
    (grpc, grpc_sent), (rest, rest_sent) = (uint8_square[t] for t in TRANSPORTS)
    assert _outcome(grpc) == _outcome(rest)

    def rows(sent: list[np.ndarray]) -> Counter[bytes]:  # requests hold as many as arrived
        return Counter(row.tobytes() for request in sent for row in request)

    assert rows(grpc_sent) == rows(rest_sent)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_score_attack_on_the_label_only_endpoint_names_the_decision_attacks(
    endpoints: Foreign, tmp_path: Path, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    argv = ["attack", "query", "--url", endpoints.url("label", transport), "--model", MODEL,
            "--attack", "square", "--budget", "5", "--num-images", "2",
            "--out", str(tmp_path / "l"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("defcnn attack: error: ") and "square needs scores" in err, err
    for name in ("hopskipjump", "boundary", "geoda", "signopt"):
        assert name in err
    assert not (tmp_path / "l" / "results.json").exists()


def test_too_few_stated_classes_are_refused_before_any_query(
    endpoints: Foreign, tmp_path: Path, capsys
) -> None:
    """`--num-classes` below the data set's classes on a label-only endpoint: one clear
    line and exit 2, asking for the label map, before the attack sends anything."""
    argv = ["attack", "query", "--url", endpoints.url("label", "grpc"), "--model", MODEL,
            "--attack", "hopskipjump", "--budget", "20", "--num-classes", "2",
            "--num-images", "4", "--out", str(tmp_path / "q"), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--label-map" in err and "Traceback" not in err
    assert not (tmp_path / "q" / "traces").exists()
