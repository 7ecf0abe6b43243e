"""`InferenceClient.spec`, `scores` and `labels` against a real server: our endpoint
describes itself as FP32 NCHW logits, the probe is one counted query, overrides hold."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from defcnn.client import AsyncInferenceClient, InferenceClient, ModelInfo, QueryCounter
from defcnn.client.spec import EndpointSpec, SpecOverrides
from defcnn.errors import ConfigError

LABELS = tuple(str(i) for i in range(10))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def test_spec_scores_and_labels(server, repo) -> None:
    x = images(20, seed=3)
    reference = repo.reference(x)
    with InferenceClient(server.address) as client:
        spec = client.spec("digits")
        assert spec == EndpointSpec(
            model="digits", version="1", input_name="input", datatype="FP32", layout="NCHW",
            channels=3, height=32, width=32, input_range=(0.0, 1.0), mean=None, std=None,
            output_name="logits", output_kind="logits", num_classes=10, labels=LABELS,
            max_batch_size=16, batch_dim=True, outputs=("logits",),
        )  # fmt: skip
        assert client.counter("digits") == QueryCounter(images=1, rpcs=1)  # the one probe
        assert client.spec("digits") is spec and client.info("digits") == ModelInfo.from_spec(spec)
        scores = client.scores("digits", x)
        assert scores.dtype == np.float32
        np.testing.assert_allclose(scores, reference, atol=1e-5)
        np.testing.assert_array_equal(scores, client.logits("digits", x))
        labels = client.labels(spec, x)
        assert labels.dtype == np.int64 and labels.tolist() == reference.argmax(1).tolist()
        assert client.counter("digits") == QueryCounter(images=1 + 3 * 20, rpcs=1 + 3 * 2)
        assert spec.describe() == (
            "digits v1: input 'input' FP32 NCHW 3x32x32 in [0, 1]; "
            "output 'logits' logits, 10 classes with labels; max batch 16"
        )


def test_overrides_are_cached_and_used_by_later_calls(server) -> None:
    with InferenceClient(server.address) as client:
        plain = client.spec("digits")
        told = client.spec("digits", overrides=SpecOverrides(output_kind="probabilities"))
        assert told.output_kind == "probabilities" and told != plain
        assert client.counter("digits").images == 2  # labels still come from one probe
        with pytest.raises(ConfigError, match="not logits"):
            client.logits("digits", images(1))  # the last spec() says probabilities
        p = client.probabilities("digits", images(2))  # taken as given, not softmaxed again
        np.testing.assert_array_equal(p, client.scores(plain, images(2)))
        assert client.spec("digits") is plain  # cached: no new probe
        assert client.counter("digits").images == 2 + 4
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            client.scores("digits", images(1) * 2)
        with pytest.raises(ConfigError, match="no output 'probs'"):
            client.spec("digits", overrides=SpecOverrides(output="probs"))


def test_async_spec_and_scores(server, repo) -> None:
    async def run() -> None:
        async with AsyncInferenceClient(server.address) as client:
            spec = await client.spec("digits")
            assert spec.output_kind == "logits" and spec.labels == LABELS
            x = images(5, seed=8)
            np.testing.assert_allclose(
                await client.scores("digits", x), repo.reference(x), atol=1e-5
            )
            labels = await client.labels("digits", x)
            assert labels.tolist() == repo.reference(x).argmax(1).tolist()

    asyncio.run(run())
