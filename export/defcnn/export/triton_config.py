"""config.pbtxt for a Triton model repository, written as protobuf text format.

Torch-free, so the server can read what the exporter writes. Tests parse the output with
Triton's own `ModelConfig` schema (tritonclient ships it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from defcnn.export.onnx_graph import INPUT_NAME, OUTPUT_NAME

LABELS_FILE = "labels.txt"
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

    def to_pbtxt(self) -> str:
        preferred = self.preferred or preferred_batch_sizes(self.max_batch_size)
        h = w = self.input_size
        return "\n".join(
            [
                f'name: "{self.name}"',
                f'platform: "{self.platform}"',
                f"max_batch_size: {self.max_batch_size}",
                "version_policy { all { } }",
                "input [",
                "  {",
                f'    name: "{INPUT_NAME}"',
                "    data_type: TYPE_FP32",
                f"    dims: [ 3, {h}, {w} ]",
                "  }",
                "]",
                "output [",
                "  {",
                f'    name: "{OUTPUT_NAME}"',
                "    data_type: TYPE_FP32",
                f"    dims: [ {self.num_classes} ]",
                f'    label_filename: "{LABELS_FILE}"',
                "  }",
                "]",
                "dynamic_batching {",
                f"  preferred_batch_size: [ {', '.join(str(s) for s in preferred)} ]",
                f"  max_queue_delay_microseconds: {self.max_queue_delay_us}",
                "}",
                "instance_group [",
                "  {",
                f"    count: {self.instance_count}",
                "    kind: KIND_AUTO",
                "  }",
                "]",
                "",
            ]
        )
