"""`defcnn.client` and `defcnn classify` against real servers: parity with local ONNX Runtime,
chunking, exact query counts and budget, errors, retries, auth and TLS."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defcnn.cli import main
from defcnn.client import (
    AsyncInferenceClient,
    ClientError,
    InferenceClient,
    ModelInfo,
    QueryBudgetExceeded,
    QueryCounter,
)
from defcnn.errors import ConfigError
from defcnn.images import load_images

LABELS = [str(i) for i in range(10)]
ENTRY = re.compile(r"^(\S+) \(p=([\d.]+)\)$")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def served(client: InferenceClient, model: str = "digits") -> int:
    """The server's inference_count for `model`: what it really computed for us."""
    return client.statistics(model).model_stats[0].inference_count


def check_classify(rows: list[list[tuple[str, int, float]]], reference: np.ndarray, k: int) -> None:
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference, strict=True):
        top = np.argsort(-ref, kind="stable")[:k]
        assert [index for _, index, _ in row] == top.tolist()
        assert [label for label, _, _ in row] == [LABELS[i] for i in top]
        np.testing.assert_allclose([v for _, _, v in row], ref[top], atol=1e-4)


@pytest.mark.parametrize("n", [1, 16, 40])
def test_sync_client_matches_onnx_runtime_in_order(server, repo, n: int) -> None:
    x = images(n, seed=n)
    reference = repo.reference(x)
    with InferenceClient(server.address) as client:
        assert client.info("digits") == ModelInfo(
            name="digits", version="1", input_shape=(3, 32, 32), num_classes=10,
            max_batch_size=16, labels=LABELS,
        )  # fmt: skip
        logits = client.logits("digits", x)
        assert logits.dtype == np.float32 and logits.shape == (n, 10)
        np.testing.assert_allclose(logits, reference, atol=1e-5)  # 40: 3 chunks, in order
        probabilities = client.probabilities("digits", x)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        predicted = client.predict("digits", x)
        assert predicted.dtype == np.int64 and predicted.tolist() == reference.argmax(1).tolist()
        check_classify(client.classify("digits", x, k=3), reference, 3)
        chunks = -(-n // 16)
        assert client.counter("digits") == QueryCounter(images=1 + 4 * n, rpcs=1 + 4 * chunks)


def test_async_client_matches_onnx_runtime_in_order(server, repo) -> None:
    async def run() -> None:
        async with AsyncInferenceClient(server.address, concurrency=2) as client:
            for n in (1, 16, 40):
                x = images(n, seed=100 + n)
                reference = repo.reference(x)
                np.testing.assert_allclose(await client.logits("digits", x), reference, atol=1e-5)
                probabilities = await client.probabilities("digits", x)
                np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
                assert (await client.predict("digits", x)).tolist() == reference.argmax(1).tolist()
                check_classify(await client.classify("digits", x, k=2), reference, 2)
            assert (await client.info("digits")).labels == LABELS
            assert client.counter("digits") == QueryCounter(
                images=1 + 4 * 57, rpcs=1 + 4 * (1 + 1 + 3)
            )
            x = images(3)
            results = await asyncio.gather(
                *(client.logits("digits", x[i : i + 1]) for i in range(3))
            )
            np.testing.assert_allclose(np.concatenate(results), repo.reference(x), atol=1e-5)

    asyncio.run(run())


def test_query_counts_are_exact_and_match_the_server(server) -> None:
    with InferenceClient(server.address, concurrency=3) as client:
        before = served(client)
        client.info("digits")  # the label probe: one 1-image query
        assert client.counter("digits") == QueryCounter(images=1, rpcs=1)
        client.logits("digits", images(5))
        client.logits("digits", images(40))
        client.classify("digits", images(17), k=2)
        client.predict("digits", images(16))
        counter = client.counter("digits")
        assert counter == QueryCounter(images=1 + 5 + 40 + 17 + 16, rpcs=1 + 1 + 3 + 2 + 1)
        assert client.total_queries == counter.images
        assert client.counter("other") == QueryCounter()
        assert served(client) - before == counter.images


def test_budget_refuses_a_call_before_sending_any_of_it(server) -> None:
    with InferenceClient(server.address, budget=20) as client:
        client.logits("digits", images(16))  # 16 + the 1-image label probe
        before, counted = served(client), client.counter("digits")
        with pytest.raises(QueryBudgetExceeded) as exc:
            client.logits("digits", images(8))
        assert isinstance(exc.value, ClientError) and "20" in str(exc.value)
        assert served(client) == before and client.counter("digits") == counted
        client.logits("digits", images(3))  # exactly the budget
        assert client.total_queries == 20
        with pytest.raises(QueryBudgetExceeded):
            client.predict("digits", images(1))
        assert served(client) == before + 3


def test_errors_unknown_not_ready_and_bad_shapes(server) -> None:
    with InferenceClient(server.address, retries=2, backoff=0.01) as client:
        with pytest.raises(ClientError) as exc:
            client.logits("nope", images(1))
        assert exc.value.code == "NOT_FOUND" and "nope" in exc.value.message
        with pytest.raises(ClientError) as exc:
            client.logits("broken", images(1))
        assert exc.value.code == "UNAVAILABLE"
        assert client.counter("broken") == QueryCounter(images=3, rpcs=3)  # 1 try + 2 retries
        client.info("digits")
        sent = client.counter("digits")
        bad_inputs: list[Any] = [
            images(2)[:, :, :31],
            images(2)[0],
            np.zeros((0, 3, 32, 32)),
            [["x"]],
        ]
        for bad in bad_inputs:
            with pytest.raises(ConfigError):
                client.logits("digits", bad)
        nan = images(1)
        nan[0, 0, 0, 0] = np.nan
        with pytest.raises(ConfigError, match="NaN"):
            client.logits("digits", nan)
        with pytest.raises(ConfigError):
            client.classify("digits", images(1), k=0)
        assert client.counter("digits") == sent  # nothing was sent
    for url in ("", "ftp://127.0.0.1:1", "127.0.0.1"):  # http:// is REST (test_rest.py)
        with pytest.raises(ConfigError):
            InferenceClient(url)
    with pytest.raises(ConfigError):
        InferenceClient("127.0.0.1:1", tls_cert="a.crt")


def test_retries_find_a_restarted_server(repo, launch) -> None:
    srv = launch.start(repo.root)
    port = srv.address.rsplit(":", 1)[1]
    restarted: list = []

    def restart() -> None:
        time.sleep(0.3)
        restarted.append(launch.start(repo.root, "--port", port))

    x = images(20, seed=5)
    with InferenceClient(f"grpc://{srv.address}", retries=10, backoff=0.1) as client:
        client.info("digits")
        assert srv.stop() == 0
        thread = threading.Thread(target=restart)
        thread.start()
        try:
            logits = client.logits("digits", x)
        finally:
            thread.join()
            for new in restarted:
                assert new.stop() == 0
        np.testing.assert_allclose(logits, repo.reference(x), atol=1e-5)
        assert restarted and restarted[0].address == srv.address
        assert client.counter("digits").rpcs > 1 + 2  # the probe, 2 chunks, and some retries


def test_bearer_token_and_mutual_tls(repo, launch, certificates, tmp_path: Path, capsys) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    f = {k: str(v) for k, v in certificates.items()}
    srv = launch.start(
        repo.root, "--auth-token-file", str(token), "--tls-cert", f["server.crt"],
        "--tls-key", f["server.key"], "--tls-ca", f["ca.crt"],
    )  # fmt: skip
    tls: dict[str, Any] = {
        "tls_ca": f["ca.crt"],
        "tls_cert": f["client.crt"],
        "tls_key": f["client.key"],
    }
    x = images(3, seed=9)
    try:
        with InferenceClient(srv.address, token="s3cret-token", **tls) as client:
            np.testing.assert_allclose(client.logits("digits", x), repo.reference(x), atol=1e-5)
        with InferenceClient(f"grpcs://{srv.address}", token="wrong", **tls) as client:
            with pytest.raises(ClientError) as exc:
                client.logits("digits", x)
            assert exc.value.code == "UNAUTHENTICATED"
        with InferenceClient(srv.address, token="s3cret-token", tls_ca=f["ca.crt"], retries=0) as c:
            with pytest.raises(ClientError) as exc:
                c.logits("digits", x)  # no client certificate
            assert exc.value.code == "UNAVAILABLE"
        folder = tmp_path / "images"
        folder.mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "zero.png")
        argv = ["classify", "--url", srv.address, "--model", "digits", "--token-file", str(token),
                "--tls-ca", f["ca.crt"], "--tls-cert", f["client.crt"],
                "--tls-key", f["client.key"], str(folder)]  # fmt: skip
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith(f"{folder / 'zero.png'}\t")
    finally:
        assert srv.stop() == 0


def _digit_pngs(folder: Path) -> list[Path]:
    from defcnn.data import load_dataset

    test_x = load_dataset("digits", progress=False).test_x[:3]
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "sub" / "b.PNG", folder / "c.jpg"]
    for i, path in enumerate(paths):
        image = Image.fromarray(np.ascontiguousarray(test_x[i].transpose(1, 2, 0)))
        if i == 1:
            image = image.resize((48, 40), Image.Resampling.NEAREST)  # resized back to 32 x 32
        image.save(path)
    (folder / "notes.txt").write_text("not an image")
    return sorted(paths)


def test_classify_cli_prints_top_k_per_file(server, repo, tmp_path: Path, capsys) -> None:
    paths = _digit_pngs(tmp_path / "digits")
    argv = ["classify", "--url", server.address, "--model", "digits", "--top-k", "2"]
    assert main([*argv, str(tmp_path / "digits")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    reference = repo.reference(load_images(paths, 32, 32))
    for line, ref in zip(lines, reference, strict=True):
        entries = [m for e in line.split("\t")[1].split(", ") if (m := ENTRY.match(e))]
        assert len(entries) == 2  # two entries, each "label (p=...)"
        labels = [m.group(1) for m in entries]
        probabilities = [float(m.group(2)) for m in entries]
        assert labels[0] == LABELS[int(ref.argmax())] and labels[1] in LABELS
        assert probabilities[0] >= probabilities[1]

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main([*argv, str(paths[0]), str(corrupt)]) == 1
    assert str(corrupt) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*argv, str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["classify", "--url", server.address, "--model", "nope", str(paths[0])]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_client_package_never_imports_torch() -> None:
    code = (
        "import sys, defcnn.client, defcnn.images; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
