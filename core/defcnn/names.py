"""Names shared across stages, kept free of heavy imports: the CLI's choices (so
`defcnn --help` and the torch-free server build the parser without loading torch) and the
file names of a Triton model repository and of TensorRT engines (written by export, read by
the server).

The registries that implement these names check against them (see tests/unit/test_repo.py).
"""

from __future__ import annotations

import re

ARCH_NAMES = ("densenet121", "resnet18", "resnet18_imagenet", "resnet50", "senet18", "vgg19")
DATASETS = ("digits", "cifar10-subset", "cifar10", "imagefolder")
SCHEDULES = ("paper", "fast")

# The Triton repository layout: REPO/NAME/{CONFIG_FILE, LABELS_FILE} and
# REPO/NAME/<version>/{MODEL_FILE, REPORT_FILE, TensorRT engines (engine_name)}.
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
REPORT_FILE = "verification.json"
# The exported graph's tensor names, which config.pbtxt and every client see.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# A version folder's name: ASCII digits only ("²" and "٣" are digits to str.isdigit), no
# leading zero ("01" would be version 1 twice), and small enough for Triton's int64.
_VERSION = re.compile(r"^(0|[1-9][0-9]{0,17})$")

_ENGINE = re.compile(r"^model\.sm(\d+)\.trt([\d.]+)\.(fp32|fp16)\.plan$")


def parse_version(name: str) -> int | None:
    """The version a folder name or a request's `model_version` stands for; None when it is
    not one (then it names no version)."""
    return int(name) if _VERSION.match(name) else None


def engine_name(capability: tuple[int, int], trt_version: str, precision: str) -> str:
    """An engine only runs on the GPU architecture and TensorRT version that built it."""
    return f"model.sm{capability[0]}{capability[1]}.trt{trt_version}.{precision}.plan"


def parse_engine_name(name: str) -> dict[str, str] | None:
    """{'sm', 'trt', 'precision'} for an engine file name, else None."""
    match = _ENGINE.match(name)
    if not match:
        return None
    return {"sm": match.group(1), "trt": match.group(2), "precision": match.group(3)}
