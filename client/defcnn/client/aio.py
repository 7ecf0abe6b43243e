"""The asyncio client: `InferenceClient`'s API with `async def`, chunks sent as tasks.

Validation, counting, budget and the retry policy are the shared ones from `client.py`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from defcnn.client import _codec
from defcnn.client.client import ModelInfo, _Attempts, _ClientBase, _decoded
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncInferenceClient(_ClientBase):
    """Non-blocking client; its channel opens on first use, inside the running event loop."""

    def _open(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.GRPCInferenceServiceStub | None = None
        self._semaphore = asyncio.Semaphore(self._settings.concurrency)
        self._info_lock = asyncio.Lock()

    @property
    def _stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self._channel is None or self._stub_ is None:
            self._channel = self._new_channel(grpc.aio)
            self._stub_ = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub_

    async def _call(
        self, rpc: Callable[..., Awaitable[T]], request: Any, attempts: _Attempts
    ) -> T | None:
        """One RPC with retries on UNAVAILABLE; None when the call was aborted."""
        with attempts:
            while attempts.next():
                try:
                    return await rpc(
                        request, timeout=self._settings.timeout, metadata=self._settings.metadata
                    )
                except grpc.RpcError as exc:
                    delay = attempts.failed(exc)
                await asyncio.sleep(delay)
        return None

    async def info(self, model: str, version: str = "") -> ModelInfo:
        """Shapes, batch limit and labels of a model (cached; labels cost one 1-image query)."""
        async with self._info_lock:
            key = (model, version)
            if key not in self._infos:
                meta = await self._call(
                    self._stub.ModelMetadata,
                    pb.ModelMetadataRequest(name=model, version=version), self._attempts(),
                )  # fmt: skip
                config = await self._call(
                    self._stub.ModelConfig,
                    pb.ModelConfigRequest(name=model, version=version), self._attempts(),
                )  # fmt: skip
                assert meta is not None and config is not None
                info = self._model_info(meta, config, version)
                probe = self._label_request(info, config, version)
                if probe is not None:
                    attempts = self._attempts(model, 1)
                    response = await self._call(self._stub.ModelInfer, probe, attempts)
                    assert response is not None
                    info = self._with_labels(info, response)
                self._infos[key] = info
            return self._infos[key]

    async def _bounded(self, request: pb.ModelInferRequest, attempts: _Attempts) -> Any:
        try:
            async with self._semaphore:
                return await self._call(self._stub.ModelInfer, request, attempts)
        finally:
            attempts.__exit__()  # a task cancelled while waiting still frees its reservation

    async def _infer(
        self, model: str, images: np.ndarray, version: str, k: int = 0
    ) -> list[pb.ModelInferResponse]:
        info = await self.info(model, version)
        requests = self._requests(info, images, version, k)
        abort = threading.Event()
        outcomes = await asyncio.gather(
            *(
                self._bounded(request, self._attempts(model, n, reserved=True, abort=abort))
                for n, request in requests
            ),
            return_exceptions=True,
        )
        self._first_error(outcomes)
        return [o for o in outcomes if not isinstance(o, BaseException)]  # all, after the check

    async def logits(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes] logits, in the order of `images`."""
        responses = await self._infer(model, images, version)
        return np.concatenate([_decoded(_codec.decode_logits, r) for r in responses])

    async def probabilities(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """Softmax of the logits: float32 [N, num_classes], rows summing to 1."""
        return _codec.softmax(await self.logits(model, images, version))

    async def predict(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """int64 [N] predicted class indices."""
        return (await self.logits(model, images, version)).argmax(axis=1).astype(np.int64)

    async def classify(
        self, model: str, images: np.ndarray, k: int = 1, version: str = ""
    ) -> list[list[tuple[str, int, float]]]:
        """Top-k (label, index, logit) per image from the server's classification extension."""
        self._check_k(k)
        responses = await self._infer(model, images, version, k)
        return [row for r in responses for row in _decoded(_codec.decode_classification, r)]

    async def statistics(self, model: str, version: str = "") -> pb.ModelStatisticsResponse:
        """The server's ModelStatistics for `model` (not counted as a query)."""
        request = pb.ModelStatisticsRequest(name=model, version=version)
        response = await self._call(self._stub.ModelStatistics, request, self._attempts())
        assert response is not None
        return response

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_ = None, None

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.close()
