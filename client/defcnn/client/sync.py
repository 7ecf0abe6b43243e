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
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class InferenceClient(_ClientBase):
    """Blocking client for a defcnn (or Triton) server: one channel, chunks sent by a pool."""

    def _open(self) -> None:
        self._channel = self._new_channel(grpc)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
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

    def info(self, model: str, version: str = "") -> ModelInfo:
        """Shapes, batch limit and labels of a model (cached; labels cost one 1-image query)."""
        with self._info_lock:
            key = (model, version)
            if key not in self._infos:
                meta = self._call(
                    self._stub.ModelMetadata,
                    pb.ModelMetadataRequest(name=model, version=version), self._attempts(),
                )  # fmt: skip
                config = self._call(
                    self._stub.ModelConfig,
                    pb.ModelConfigRequest(name=model, version=version), self._attempts(),
                )  # fmt: skip
                assert meta is not None and config is not None
                info = self._model_info(meta, config, version)
                probe = self._label_request(info, config, version)
                if probe is not None:
                    response = self._call(self._stub.ModelInfer, probe, self._attempts(model, 1))
                    assert response is not None
                    info = self._with_labels(info, response)
                self._infos[key] = info
            return self._infos[key]

    def _infer(
        self, model: str, images: np.ndarray, version: str, k: int = 0
    ) -> list[pb.ModelInferResponse]:
        info = self.info(model, version)
        requests = self._requests(info, images, version, k)
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

    def logits(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes] logits, in the order of `images`."""
        responses = self._infer(model, images, version)
        return np.concatenate([_decoded(_codec.decode_logits, r) for r in responses])

    def probabilities(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """Softmax of the logits: float32 [N, num_classes], rows summing to 1."""
        return _codec.softmax(self.logits(model, images, version))

    def predict(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """int64 [N] predicted class indices."""
        return self.logits(model, images, version).argmax(axis=1).astype(np.int64)

    def classify(
        self, model: str, images: np.ndarray, k: int = 1, version: str = ""
    ) -> list[list[tuple[str, int, float]]]:
        """Top-k (label, index, logit) per image from the server's classification extension."""
        self._check_k(k)
        responses = self._infer(model, images, version, k)
        return [row for r in responses for row in _decoded(_codec.decode_classification, r)]

    def statistics(self, model: str, version: str = "") -> pb.ModelStatisticsResponse:
        """The server's ModelStatistics for `model` (not counted as a query)."""
        request = pb.ModelStatisticsRequest(name=model, version=version)
        response = self._call(self._stub.ModelStatistics, request, self._attempts())
        assert response is not None
        return response

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()
