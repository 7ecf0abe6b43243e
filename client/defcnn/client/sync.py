"""The blocking client: chunks of one call go out concurrently from a thread pool over one
channel; validation, counting, budget and retries are the shared ones from `client.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from defcnn.client import _codec
from defcnn.client.client import ModelInfo, _Attempts, _ClientBase, _decoded
from defcnn.client.errors import ClientError
from defcnn.client.spec import EndpointSpec, SpecOverrides
from defcnn.client.transport import open_transport
from defcnn.protos import grpc_service_pb2 as pb

T = TypeVar("T")


class InferenceClient(_ClientBase):
    """Blocking client for a defcnn (or Triton) server: one channel, chunks sent by a pool."""

    def _open(self) -> None:
        # gRPC or REST by the URL's scheme; the stub's calls either way (transport.py).
        self._stub = open_transport(self._settings, lambda: self._new_channel(grpc))
        self._pool = ThreadPoolExecutor(self._settings.concurrency, "defcnn-client")
        self._info_lock = threading.Lock()

    def _call(self, rpc: Callable[..., T], request: Any, attempts: _Attempts) -> T | None:
        """One RPC with retries on UNAVAILABLE; None when the call was aborted."""
        with attempts:
            while attempts.next():
                try:
                    return rpc(
                        request, timeout=self._settings.timeout, metadata=self._settings.metadata
                    )
                except grpc.RpcError as exc:
                    delay = attempts.failed(exc)
                time.sleep(delay)
        return None

    def spec(
        self, model: str, version: str = "", overrides: SpecOverrides | None = None
    ) -> EndpointSpec:
        """What `model` takes and answers (cached per model, version and overrides; later
        calls on `model` use the last spec built for it). Costs at most one counted 1-image
        query: a zero image, classified over every class when the server has labels, or sent
        plainly when only the answer can tell logits from probabilities (none when
        `overrides.output_kind` says which and there are no labels to read)."""
        overrides = overrides or SpecOverrides()
        key = (model, version, overrides)
        with self._info_lock:
            if key in self._specs:
                return self._keep(key, self._specs[key])
            meta = self._call(
                self._stub.ModelMetadata,
                pb.ModelMetadataRequest(name=model, version=version), self._attempts(),
            )  # fmt: skip
            try:
                config = self._call(
                    self._stub.ModelConfig,
                    pb.ModelConfigRequest(name=model, version=version), self._attempts(),
                )  # fmt: skip
            except ClientError as exc:
                if not self._no_config(exc):
                    raise
                config = None
            assert meta is not None
            draft, probe = self._probe(meta, config, version, overrides)
            response = None
            if probe is not None:
                response = self._call(self._stub.ModelInfer, probe, self._attempts(model, 1))
                assert response is not None
            spec = self._probed(meta, config, version, overrides, draft, probe, response)
            return self._keep(key, spec)

    def _spec(self, model: str | EndpointSpec, version: str) -> EndpointSpec:
        if isinstance(model, EndpointSpec):
            return model
        return self._known(model, version) or self.spec(model, version)

    def info(self, model: str, version: str = "") -> ModelInfo:
        """Shapes, batch limit and labels of a model: a view of its `spec()`."""
        return ModelInfo.from_spec(self._spec(model, version))

    def _infer(
        self, spec: EndpointSpec, images: np.ndarray, k: int = 0
    ) -> list[pb.ModelInferResponse]:
        model = spec.model
        requests = self._requests(spec, images, k)
        abort = threading.Event()
        futures = [
            self._pool.submit(
                self._call,
                self._stub.ModelInfer,
                request,
                self._attempts(model, n, reserved=True, abort=abort),
            )
            for n, request in requests
        ]
        try:
            wait(futures)
        except BaseException:  # Ctrl-C or SIGTERM: no chunk may retry or start afterwards
            abort.set()
            for f in futures:
                f.cancel()
            raise
        self._first_error([f.exception() for f in futures])
        responses = [f.result() for f in futures]
        if any(r is None for r in responses):  # only an aborted call, and abort means a raise
            raise ClientError("CANCELLED", "a request was aborted before it was answered")
        return [r for r in responses if r is not None]

    def scores(
        self, model: str | EndpointSpec, images: np.ndarray, version: str = ""
    ) -> np.ndarray:
        """float32 [N, C] scores as the endpoint gives them (logits or probabilities, as its
        spec says), in the order of `images` (float32 [N, 3, H, W] in [0, 1])."""
        spec = self._spec(model, version)
        self._need_scores(spec)
        return self._scores(spec, self._infer(spec, images))

    def labels(
        self, model: str | EndpointSpec, images: np.ndarray, version: str = ""
    ) -> np.ndarray:
        """int64 [N] classes: the argmax of the scores, or the endpoint's label output."""
        spec = self._spec(model, version)
        return self._labels(spec, self._infer(spec, images))

    def logits(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes] logits, in the order of `images` (a logits endpoint)."""
        spec = self._spec(model, version)
        self._need_scores(spec, "logits")
        return self._scores(spec, self._infer(spec, images))

    def probabilities(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes], rows summing to 1: the softmax of logits, or the
        endpoint's own probabilities."""
        spec = self._spec(model, version)
        self._need_scores(spec)
        return self._probabilities(spec, self._scores(spec, self._infer(spec, images)))

    def predict(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """int64 [N] predicted class indices (`labels`)."""
        return self.labels(model, images, version)

    def classify(
        self, model: str, images: np.ndarray, k: int = 1, version: str = ""
    ) -> list[list[tuple[str, int, float]]]:
        """Top-k (label, index, logit) per image from the server's classification extension."""
        self._check_k(k)
        responses = self._infer(self._spec(model, version), images, k)
        return [row for r in responses for row in _decoded(_codec.decode_classification, r)]

    def statistics(self, model: str, version: str = "") -> pb.ModelStatisticsResponse:
        """The server's ModelStatistics for `model` (not counted as a query)."""
        request = pb.ModelStatisticsRequest(name=model, version=version)
        response = self._call(self._stub.ModelStatistics, request, self._attempts())
        assert response is not None
        return response

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stub.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()
