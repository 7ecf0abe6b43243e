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
from defcnn.client.errors import ClientError
from defcnn.client.spec import EndpointSpec, SpecOverrides
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncInferenceClient(_ClientBase):
    """Non-blocking client; its channel opens on first use, inside the running event loop."""

    def _open(self) -> None:
        if self._settings.rest_url is not None:
            raise ConfigError(
                f"AsyncInferenceClient speaks gRPC only; for the REST endpoint "
                f"{self._settings.rest_url} use InferenceClient (or a grpc:// URL)"
            )
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

    async def spec(
        self, model: str, version: str = "", overrides: SpecOverrides | None = None
    ) -> EndpointSpec:
        """`InferenceClient.spec`: cached, at most one counted 1-image probe query."""
        overrides = overrides or SpecOverrides()
        key = (model, version, overrides)
        async with self._info_lock:
            if key in self._specs:
                return self._keep(key, self._specs[key])
            meta = await self._call(
                self._stub.ModelMetadata,
                pb.ModelMetadataRequest(name=model, version=version), self._attempts(),
            )  # fmt: skip
            try:
                config = await self._call(
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
                attempts = self._attempts(model, 1)
                response = await self._call(self._stub.ModelInfer, probe, attempts)
                assert response is not None
            spec = self._probed(meta, config, version, overrides, draft, probe, response)
            return self._keep(key, spec)

    async def _spec(self, model: str | EndpointSpec, version: str) -> EndpointSpec:
        if isinstance(model, EndpointSpec):
            return model
        return self._known(model, version) or await self.spec(model, version)

    async def info(self, model: str, version: str = "") -> ModelInfo:
        """Shapes, batch limit and labels of a model: a view of its `spec()`."""
        return ModelInfo.from_spec(await self._spec(model, version))

    async def _bounded(self, request: pb.ModelInferRequest, attempts: _Attempts) -> Any:
        try:
            async with self._semaphore:
                return await self._call(self._stub.ModelInfer, request, attempts)
        finally:
            attempts.__exit__()  # a task cancelled while waiting still frees its reservation

    async def _infer(
        self, spec: EndpointSpec, images: np.ndarray, k: int = 0
    ) -> list[pb.ModelInferResponse]:
        model = spec.model
        requests = self._requests(spec, images, k)
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

    async def scores(
        self, model: str | EndpointSpec, images: np.ndarray, version: str = ""
    ) -> np.ndarray:
        """float32 [N, C] scores as the endpoint gives them (`InferenceClient.scores`)."""
        spec = await self._spec(model, version)
        self._need_scores(spec)
        return self._scores(spec, await self._infer(spec, images))

    async def labels(
        self, model: str | EndpointSpec, images: np.ndarray, version: str = ""
    ) -> np.ndarray:
        """int64 [N] classes: the argmax of the scores, or the endpoint's label output."""
        spec = await self._spec(model, version)
        return self._labels(spec, await self._infer(spec, images))

    async def logits(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes] logits, in the order of `images` (a logits endpoint)."""
        spec = await self._spec(model, version)
        self._need_scores(spec, "logits")
        return self._scores(spec, await self._infer(spec, images))

    async def probabilities(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """float32 [N, num_classes], rows summing to 1 (softmax of logits, or the endpoint's)."""
        spec = await self._spec(model, version)
        self._need_scores(spec)
        return self._probabilities(spec, self._scores(spec, await self._infer(spec, images)))

    async def predict(self, model: str, images: np.ndarray, version: str = "") -> np.ndarray:
        """int64 [N] predicted class indices (`labels`)."""
        return await self.labels(model, images, version)

    async def classify(
        self, model: str, images: np.ndarray, k: int = 1, version: str = ""
    ) -> list[list[tuple[str, int, float]]]:
        """Top-k (label, index, logit) per image from the server's classification extension."""
        self._check_k(k)
        responses = await self._infer(await self._spec(model, version), images, k)
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
