"""config.pbtxt for a Triton model repository: a `ModelConfig` message written in protobuf
text format, with the same schema (`defcnn.protos.model_config_pb2`) and library
(`google.protobuf.text_format`) the server reads it with.

Torch-free. Tests also parse the output with Triton's own `ModelConfig` schema (tritonclient
ships it). Fields at their default (KIND_AUTO, a zero queue delay) are left out of the text,
as text format does; every reader sees them as set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import text_format

from defcnn.names import INPUT_NAME, LABELS_FILE, OUTPUT_NAME
from defcnn.protos import model_config_pb2

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 4 up to and including the maximum (the maximum always last)."""
    sizes = [s for s in (4, 8, 16, 32, 64, 128, 256) if s < max_batch_size]
    return [*sizes[-3:], max_batch_size]


@dataclass(frozen=True)
class TritonModelConfig:
    """The subset of Triton's ModelConfig that our models use."""

    name: str
    input_size: int
    num_classes: int
    max_batch_size: int = 64
    platform: str = "onnxruntime_onnx"
    # 0: no waiting for company. On a CPU a busy backend is what forms batches (requests
    # queue while one batch runs); raise it on GPUs, where a bigger batch costs little more.
    max_queue_delay_us: int = 0
    instance_count: int = 1
    preferred: list[int] = field(default_factory=list)

    def to_model_config(self) -> model_config_pb2.ModelConfig:
        h = w = self.input_size
        config = model_config_pb2.ModelConfig(
            name=self.name,
            platform=self.platform,
            max_batch_size=self.max_batch_size,
        )
        config.version_policy.all.SetInParent()  # serve every version folder
        config.input.add(name=INPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[3, h, w])
        config.output.add(
            name=OUTPUT_NAME,
            data_type=model_config_pb2.TYPE_FP32,
            dims=[self.num_classes],
            label_filename=LABELS_FILE,
        )
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(
            self.preferred or preferred_batch_sizes(self.max_batch_size)
        )
        batching.max_queue_delay_microseconds = self.max_queue_delay_us
        config.instance_group.add(
            count=self.instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO
        )
        return config

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_model_config())
