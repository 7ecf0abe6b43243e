"""`defcnn.client.spec` and the client codec on hand-built metadata: what each endpoint shape
becomes, every refusal naming what to pass instead, and exact encoding round trips."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from defcnn.client import _codec
from defcnn.client.spec import (
    UNCONFIGURED_BATCH,
    EndpointSpec,
    SpecOverrides,
    build_spec,
    needs_probe,
    probe_kind,
)
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb

LOGITS = np.array([2.0, -1.0, 0.5], np.float32)
PROBS = np.array([0.7, 0.2, 0.1], np.float32)


def meta(
    inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]
) -> pb.ModelMetadataResponse:
    m = pb.ModelMetadataResponse(name="m", versions=["1", "3", "2"], platform="onnxruntime_onnx")
    for name, datatype, shape in inputs:
        m.inputs.add(name=name, datatype=datatype, shape=shape)
    for name, datatype, shape in outputs:
        m.outputs.add(name=name, datatype=datatype, shape=shape)
    return m


def config(max_batch_size: int) -> pb.ModelConfigResponse:
    c = pb.ModelConfigResponse()
    c.config.name = "m"
    c.config.max_batch_size = max_batch_size
    return c


@dataclass
class Case:
    inputs: list[tuple[str, str, list[int]]]
    outputs: list[tuple[str, str, list[int]]]
    expect: dict[str, Any]
    max_batch: int | None = 8
    overrides: SpecOverrides = field(default_factory=SpecOverrides)
    scores: np.ndarray | None = None


CASES = {
    "nchw fp32 logits": Case(
        [("input", "FP32", [-1, 3, 32, 32])], [("logits", "FP32", [-1, 3])],
        {"datatype": "FP32", "layout": "NCHW", "height": 32, "width": 32, "version": "3",
         "input_range": (0.0, 1.0), "output_kind": "logits", "num_classes": 3,
         "max_batch_size": 8, "batch_dim": True},
        scores=LOGITS,
    ),
    "nhwc uint8 probabilities": Case(
        [("images", "UINT8", [-1, 24, 16, 3])], [("probs", "FP32", [-1, 3])],
        {"datatype": "UINT8", "layout": "NHWC", "height": 24, "width": 16,
         "input_range": (0.0, 255.0), "output_kind": "probabilities", "input_name": "images"},
        scores=PROBS,
    ),
    "fp16 in and out": Case(
        [("x", "FP16", [-1, 3, 8, 8])], [("y", "FP16", [-1, 3])],
        {"datatype": "FP16", "output_kind": "logits"}, scores=LOGITS,
    ),
    "label-only int64 [N]": Case(
        [("x", "FP32", [-1, 3, 8, 8])], [("label", "INT64", [-1])],
        {"output_kind": "label", "num_classes": None},
    ),
    "label-only int32 [N, 1] with num_classes": Case(
        [("x", "FP32", [-1, 3, 8, 8])], [("label", "INT32", [-1, 1])],
        {"output_kind": "label", "num_classes": 10},
        overrides=SpecOverrides(num_classes=10),
    ),
    "implicit batch dimension (Triton config dims)": Case(
        [("x", "FP32", [3, 8, 8])], [("y", "FP32", [5])],
        {"batch_dim": True, "max_batch_size": 8, "num_classes": 5}, scores=np.zeros(5),
    ),
    "no batching, no batch dimension": Case(
        [("x", "FP32", [3, 8, 8])], [("y", "FP32", [5])],
        {"batch_dim": False, "max_batch_size": 0, "request_batch": 1},
        max_batch=0, scores=np.zeros(5),
    ),
    "fixed batch of one, no config": Case(
        [("x", "FP32", [1, 3, 8, 8])], [("y", "FP32", [1, 5])],
        {"batch_dim": True, "max_batch_size": 1}, max_batch=None, scores=np.zeros(5),
    ),
    "several outputs: the one scores-shaped": Case(
        [("x", "FP32", [-1, 3, 8, 8])],
        [("features", "FP32", [-1, 64, 2, 2]), ("logits", "FP32", [-1, 3]),
         ("label", "INT64", [-1])],
        {"output_name": "logits", "outputs": ("features", "logits", "label")}, scores=LOGITS,
    ),
    "several outputs: --output picks": Case(
        [("x", "FP32", [-1, 3, 8, 8])], [("a", "FP32", [-1, 3]), ("b", "INT64", [-1])],
        {"output_name": "b", "output_kind": "label"}, overrides=SpecOverrides(output="b"),
    ),
    "overrides win": Case(
        [("x", "FP32", [-1, 3, 3, 3])], [("y", "FP32", [-1, 3])],
        {"layout": "NHWC", "input_range": (-1.0, 1.0), "mean": (0.5,), "std": (0.2, 0.3, 0.4),
         "output_kind": "probabilities"},
        overrides=SpecOverrides(
            layout="NHWC", input_range=(-1, 1), mean=(0.5,), std=(0.2, 0.3, 0.4),
            output_kind="probabilities",
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_build_spec(case: Case) -> None:
    cfg = None if case.max_batch is None else config(case.max_batch)
    spec = build_spec(meta(case.inputs, case.outputs), cfg, case.overrides, scores=case.scores)
    for name, value in case.expect.items():
        assert getattr(spec, name) == value, name
    assert spec.channels == 3 and spec.model == "m"
    assert spec.score_based == (spec.output_kind != "label")
    assert EndpointSpec.from_dict(spec.to_dict()) == spec
    line = spec.describe()
    assert "\n" not in line and spec.output_name in line and spec.output_kind in line
    if len(spec.outputs) > 1:
        assert "chosen over" in line


ERRORS = {
    "ambiguous layout": (
        Case([("x", "FP32", [-1, 3, 3, 3])], [("y", "FP32", [-1, 3])], {}), "--layout"),
    "no channel axis of 3": (
        Case([("x", "FP32", [-1, 1, 28, 28])], [("y", "FP32", [-1, 3])], {}), "--layout"),
    "greyscale by override": (
        Case([("x", "FP32", [-1, 1, 28, 28])], [("y", "FP32", [-1, 3])], {},
             overrides=SpecOverrides(layout="NCHW")), "channels"),
    "dynamic height": (
        Case([("x", "FP32", [-1, 3, -1, 32])], [("y", "FP32", [-1, 3])], {}), "variable"),
    "unsupported input datatype": (
        Case([("x", "INT8", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])], {}), "INT8"),
    "unsupported output datatype": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("y", "BOOL", [-1])], {}), "BOOL"),
    "two inputs": (
        Case([("a", "FP32", [-1, 3, 8, 8]), ("b", "FP32", [-1, 3, 8, 8])],
             [("y", "FP32", [-1, 3])], {}), "a (FP32"),
    "several outputs, none picked": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("a", "FP32", [-1, 3]), ("b", "FP32", [-1, 4])],
             {}), "--output"),
    "unknown --output": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("a", "FP32", [-1, 3])], {},
             overrides=SpecOverrides(output="z")), "no output 'z'"),
    "kind unknown without a probe": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])], {}), "output_kind"),
    "label kind for scores": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])], {},
             overrides=SpecOverrides(output_kind="label")), "label output"),
    "num_classes contradicts the shape": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])], {},
             overrides=SpecOverrides(num_classes=5), scores=LOGITS), "contradicts"),
    "fixed batch of 4": (
        Case([("x", "FP32", [4, 3, 8, 8])], [("y", "FP32", [4, 3])], {}), "fixed batch"),
    "label output with a class axis": (
        Case([("x", "FP32", [-1, 3, 8, 8])], [("y", "INT64", [-1, 3])], {}), "one class"),
}  # fmt: skip


@pytest.mark.parametrize("case,message", ERRORS.values(), ids=list(ERRORS))
def test_build_spec_refuses(case: Case, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_spec(meta(case.inputs, case.outputs), config(8), case.overrides, scores=case.scores)


@pytest.mark.parametrize(
    "kw",
    [{"layout": "CHW"}, {"input_range": (1, 0)}, {"input_range": (0,)}, {"mean": (0, 0)},
     {"std": (0.0,)}, {"std": (float("nan"),)}, {"output_kind": "scores"}, {"num_classes": 0},
     {"num_classes": True}, {"output": ""}],
)  # fmt: skip
def test_overrides_validate(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SpecOverrides(**kw)


def test_overrides_hash_and_probe_rules() -> None:
    from_json = SpecOverrides(mean=[0.5])  # type: ignore[arg-type]  # lists, as JSON gives
    assert hash(from_json) == hash(SpecOverrides(mean=(0.5,))) and from_json.mean == (0.5,)
    m = meta([("x", "FP32", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])])
    assert needs_probe(m, None) and not needs_probe(m, SpecOverrides(output_kind="logits"))
    assert not needs_probe(meta([("x", "FP32", [-1, 3, 8, 8])], [("y", "INT64", [-1])]), None)
    assert probe_kind(PROBS) == "probabilities" and probe_kind(LOGITS) == "logits"
    assert probe_kind(np.array([0.5, 0.5 + 9e-4])) == "probabilities"
    assert probe_kind(np.array([0.5, 0.502])) == "logits"
    assert probe_kind(np.array([1.2, -0.2])) == "logits"  # sums to 1, but negative
    with pytest.raises(ConfigError):
        probe_kind(np.array([np.nan, 1.0]))
    with pytest.raises(ConfigError, match="unknown fields"):
        EndpointSpec.from_dict({"nope": 1})


def test_batch_size_without_a_config_and_its_override() -> None:
    """A leading -1 and no ModelConfig (KServe): UNCONFIGURED_BATCH images per request, not
    one; --max-batch-size wins over both that and a config's value."""
    m = meta([("x", "FP32", [-1, 3, 8, 8])], [("y", "FP32", [-1, 3])])
    assert build_spec(m, None, scores=LOGITS).max_batch_size == UNCONFIGURED_BATCH
    assert build_spec(m, config(8), scores=LOGITS).max_batch_size == 8
    chosen = SpecOverrides(max_batch_size=5)
    assert build_spec(m, None, chosen, scores=LOGITS).max_batch_size == 5
    assert build_spec(m, config(8), chosen, scores=LOGITS).max_batch_size == 5
    one = meta([("x", "FP32", [3, 8, 8])], [("y", "FP32", [3])])  # no batch dimension
    assert build_spec(one, None, scores=LOGITS).max_batch_size == 0
    with pytest.raises(ConfigError, match="one image per request"):
        build_spec(one, None, chosen, scores=LOGITS)
    with pytest.raises(ConfigError, match="max_batch_size"):
        SpecOverrides(max_batch_size=0)


def _spec(**kw: Any) -> EndpointSpec:
    base: dict[str, Any] = dict(
        model="m", version="1", input_name="x", datatype="FP32", layout="NCHW", channels=3,
        height=2, width=3, input_range=(0.0, 1.0), mean=None, std=None, output_name="y",
        output_kind="logits", num_classes=4, labels=(), max_batch_size=8,
    )  # fmt: skip
    return EndpointSpec(**{**base, **kw})


def _sent(request: pb.ModelInferRequest, dtype: str) -> np.ndarray:
    shape = list(request.inputs[0].shape)
    return np.frombuffer(request.raw_input_contents[0], dtype=dtype).reshape(shape)


def test_encoding_nhwc_uint8_is_exact() -> None:
    k = np.arange(256).reshape(1, 256, 1, 1).repeat(3, axis=0)  # every level, each channel
    x = (k.reshape(1, 3, 16, 16) / 255).astype(np.float32)
    spec = _spec(datatype="UINT8", layout="NHWC", height=16, width=16, input_range=(0.0, 255.0))
    request = _codec.infer_request(spec, _codec.check_images(spec, x))
    assert request.inputs[0].datatype == "UINT8" and list(request.inputs[0].shape) == [1, 16, 16, 3]
    np.testing.assert_array_equal(
        _sent(request, "u1"), k.reshape(1, 3, 16, 16).transpose(0, 2, 3, 1)
    )
    two = _spec(datatype="UINT8", input_range=(0.0, 2.0))  # halves round to even
    quarters = np.array([0.25, 0.75, 1.0], np.float32).reshape(1, 1, 1, 3).repeat(3, 1)
    assert _codec.encode_images(two, quarters.repeat(2, 2)).ravel()[:3].tolist() == [0, 2, 2]
    wide = _spec(datatype="UINT8", input_range=(0.0, 300.0))  # past 255: clipped
    assert _codec.encode_images(wide, np.ones((1, 3, 2, 3), np.float32)).max() == 255


def test_encoding_range_mean_std_fp16_and_no_batch_dim() -> None:
    x = np.random.default_rng(0).random((2, 3, 2, 3), dtype=np.float32)
    spec = _spec(input_range=(-1.0, 1.0), mean=(0.1, 0.2, 0.3), std=(0.5,))
    sent = _sent(_codec.infer_request(spec, x), "<f4")
    expected = ((x * 2 - 1) - np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)) / 0.5
    np.testing.assert_allclose(sent, expected, rtol=1e-6)
    half = _spec(datatype="FP16")
    np.testing.assert_array_equal(_sent(_codec.infer_request(half, x), "<f2"), x.astype(np.float16))
    plain = _spec()
    assert _codec.infer_request(plain, x).raw_input_contents[0] == x.astype("<f4").tobytes()
    single = _spec(batch_dim=False, max_batch_size=0)
    assert list(_codec.infer_request(single, x[:1]).inputs[0].shape) == [3, 2, 3]


@pytest.mark.parametrize(
    "bad,message",
    [(np.zeros((1, 3, 3, 2)), "float32 \\[N, 3, 2, 3\\]"), (np.zeros((0, 3, 2, 3)), "N >= 1"),
     (np.full((1, 3, 2, 3), np.nan), "NaN"), (np.full((1, 3, 2, 3), 1.01), "\\[0, 1\\]"),
     (np.full((1, 3, 2, 3), -0.1), "\\[0, 1\\]"), ([["x"]], "float32")],
)  # fmt: skip
def test_images_are_checked(bad: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _codec.check_images(_spec(), bad)


def _response(name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)
    return response


def _bytes(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s.encode() for s in items)


def test_decoding_scores_and_labels() -> None:
    scores = np.arange(8, dtype=np.float16).reshape(2, 4)
    out = _codec.decode_scores(_response("y", "FP16", [2, 4], scores.tobytes()), _spec())
    assert out.dtype == np.float32 and out.tolist() == scores.tolist()
    with pytest.raises(ValueError, match="4 scores"):
        _codec.decode_scores(_response("y", "FP32", [2, 2], np.zeros(4, "<f4").tobytes()), _spec())
    typed = pb.ModelInferResponse()
    typed.outputs.add(name="y", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [1, 2, 3, 4]
    )
    assert _codec.decode_scores(typed, _spec()).tolist() == [[1, 2, 3, 4]]
    label = _spec(output_kind="label", output_name="c", labels=("a", "b", "c", "d"))
    for datatype, raw in (
        ("INT64", np.array([[3], [0]], "<i8").tobytes()),
        ("INT32", np.array([3, 0], "<i4").tobytes()),
        ("BYTES", _bytes(["3", "0"])),
        ("BYTES", _bytes(["0.9:3:d", "0.8:0:a"])),
        ("BYTES", _bytes(["d", "a"])),
    ):
        got = _codec.decode_label_output(_response("c", datatype, [2], raw), label)
        assert got.dtype == np.int64 and got.tolist() == [3, 0], datatype
    with pytest.raises(ValueError, match="outside"):
        _codec.decode_label_output(
            _response("c", "INT64", [1], np.array([4], "<i8").tobytes()), label
        )


def test_decode_probe_reads_labels_and_scores() -> None:
    raw = _bytes(["2.500000:1:one", "-1.000000:0:zero", "0.100000:2:two"])
    labels, row = _codec.decode_probe(_response("y", "BYTES", [1, 3], raw), 3)
    assert labels == ["zero", "one", "two"] and row.tolist() == pytest.approx([-1.0, 2.5, 0.1])
    with pytest.raises(ValueError, match="left some out"):
        _codec.decode_probe(_response("y", "BYTES", [1, 3], raw), 4)
