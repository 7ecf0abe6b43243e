"""Clients for a defcnn (KServe v2 / Triton gRPC) server: numpy in, logits and labels out.

Torch-free on purpose (numpy, grpc and httpx only), so attack harnesses and services can query a
model without the training stack.
"""

from defcnn.client.aio import AsyncInferenceClient
from defcnn.client.client import ModelInfo, QueryCounter
from defcnn.client.errors import ClientError, QueryBudgetExceeded
from defcnn.client.sync import InferenceClient

__all__ = [
    "AsyncInferenceClient",
    "ClientError",
    "InferenceClient",
    "ModelInfo",
    "QueryBudgetExceeded",
    "QueryCounter",
]
