"""Protocol definitions: generated code is current, and the wire format is Triton's.

tritonclient's generated modules register the same ``inference.*`` symbols in protobuf's
default descriptor pool as ours, so they are never imported in this process: a subprocess
imports them and hands back their serialized FileDescriptorProtos, which are compared here
with ours as plain descriptor messages.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from defcnn.protos import generate, grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

FieldProto = descriptor_pb2.FieldDescriptorProto

# Fields of Triton's model_config.proto we deliberately leave out ("Message.field"); none now.
MODEL_CONFIG_OMITTED: set[str] = set()

EXPORTER_CONFIG = """\
name: "digits-def"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy { all { } }
input [ { name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
dynamic_batching { preferred_batch_size: [ 8, 16, 32, 64 ] max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_AUTO } ]
"""

# Runs in a subprocess: the only place tritonclient's generated modules are imported.
_TRITON_SCRIPT = """
import base64, json, sys
try:
    from tritonclient.grpc import service_pb2 as service
except ImportError:  # older tritonclient releases
    from tritonclient.grpc import grpc_service_pb2 as service
from tritonclient.grpc import model_config_pb2
from google.protobuf import json_format

request = service.ModelInferRequest.FromString(base64.b64decode(sys.stdin.read()))
print(json.dumps({
    "grpc_service": base64.b64encode(service.DESCRIPTOR.serialized_pb).decode(),
    "model_config": base64.b64encode(model_config_pb2.DESCRIPTOR.serialized_pb).decode(),
    "request": json_format.MessageToDict(request),
}))
"""


def _sample_request() -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(model_name="digits-def", model_version="1", id="7")
    request.parameters["priority"].uint64_param = 2
    request.parameters["sequence_start"].bool_param = True
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([0.5, 1.0, -2.0])
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    request.raw_input_contents.append(b"\x00\x01\x02")
    return request


@pytest.fixture(scope="module")
def triton() -> dict:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (pip install -e '.[test]')")
    request = base64.b64encode(_sample_request().SerializeToString()).decode()
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT],
        input=request, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _file(serialized: bytes | str) -> descriptor_pb2.FileDescriptorProto:
    if isinstance(serialized, str):
        serialized = base64.b64decode(serialized)
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def _messages(
    scope: str, messages: Iterator[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """Every message, nested ones (map entries included) too, by full name."""
    for message in messages:
        name = f"{scope}.{message.name}"
        yield name, message
        yield from _messages(name, message.nested_type)


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    scope = f".{file.package}"
    enums = {f"{scope}.{e.name}": e for e in file.enum_type}
    for name, message in _messages(scope, file.message_type):
        enums.update({f"{name}.{e.name}": e for e in message.enum_type})
    return {name: {v.name: v.number for v in e.value} for name, e in enums.items()}


def _shape(
    message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto
) -> tuple:
    """What has to match for the wire (and text) format to agree."""
    oneof = None
    if field.HasField("oneof_index") and not field.proto3_optional:
        oneof = message.oneof_decl[field.oneof_index].name
    return (
        field.number,
        FieldProto.Type.Name(field.type),
        FieldProto.Label.Name(field.label),
        field.type_name,
        oneof,
        field.proto3_optional,
    )


def _compare(ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto):
    """(mismatches, omitted) between our file and Triton's, names as "Message.field"."""
    assert ours.package == theirs.package == "inference"
    assert ours.syntax == theirs.syntax == "proto3"
    scope = f".{ours.package}"
    our_messages = dict(_messages(scope, ours.message_type))
    mismatches, omitted = [], []
    for name, message in _messages(scope, theirs.message_type):
        if name not in our_messages:
            omitted.append(name)
            continue
        our_fields = {f.name: f for f in our_messages[name].field}
        for field in message.field:
            if field.name not in our_fields:
                omitted.append(f"{name}.{field.name}")
                continue
            mine = _shape(our_messages[name], our_fields.pop(field.name))
            triton = _shape(message, field)
            if mine != triton:
                mismatches.append(f"{name}.{field.name}: ours {mine}, Triton {triton}")
        mismatches += [f"{name}.{f}: not in Triton" for f in our_fields]
        if our_messages[name].options.map_entry != message.options.map_entry:
            mismatches.append(f"{name}: map entry differs")
    our_enums = _enums(ours)
    for name, values in _enums(theirs).items():
        if name not in our_enums:
            omitted.append(name)
            continue
        for value, number in values.items():
            if value not in our_enums[name]:
                omitted.append(f"{name}.{value}")
            elif our_enums[name][value] != number:
                mismatches.append(f"{name}.{value}: ours {our_enums[name][value]}, Triton {number}")
    return mismatches, omitted


# --------------------------------------------------------------- generated code


def test_generated_code_is_current() -> None:
    assert generate.stale_files() == [], "run: python -m defcnn.protos.generate"


def test_stale_check_catches_an_edited_proto(tmp_path: Path) -> None:
    package = tmp_path / generate.PACKAGE_DIR
    shutil.copytree(generate.PROTO_ROOT / generate.PACKAGE_DIR, package,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    assert generate.stale_files(tmp_path) == []  # the output does not depend on where it runs
    proto = package / "grpc_service.proto"
    edited = proto.read_text().replace("  bool live = 1;\n", "  bool live = 1;\n  int32 x = 2;\n")
    assert edited != proto.read_text()
    proto.write_text(edited)
    assert generate.stale_files(tmp_path) == [
        "defcnn/protos/grpc_service_pb2.py",
        "defcnn/protos/grpc_service_pb2.pyi",
    ]
    assert generate.main(["--check", "--proto-root", str(tmp_path)]) == 1
    (package / "model_config_pb2.pyi").unlink()
    assert "defcnn/protos/model_config_pb2.pyi" in generate.stale_files(tmp_path)
    assert generate.main(["--proto-root", str(tmp_path)]) == 0  # regenerating fixes it all
    assert generate.main(["--check", "--proto-root", str(tmp_path)]) == 0
    assert not (package / "model_config_pb2_grpc.py").exists()


# ------------------------------------------------------ wire compatibility


def test_service_has_every_triton_method(triton: dict) -> None:
    ours = {m.name: m for m in _file(grpc_service_pb2.DESCRIPTOR.serialized_pb).service[0].method}
    theirs = _file(triton["grpc_service"])
    assert [s.name for s in theirs.service] == ["GRPCInferenceService"]
    assert len(ours) == len(theirs.service[0].method) == 20
    for method in theirs.service[0].method:
        assert method.name in ours, method.name
        mine = ours[method.name]
        assert (mine.input_type, mine.output_type) == (method.input_type, method.output_type)
        assert (mine.client_streaming, mine.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )
    assert ours["ModelStreamInfer"].client_streaming and ours["ModelStreamInfer"].server_streaming


def test_stub_uses_tritons_method_paths(triton: dict) -> None:
    calls: dict[str, str] = {}

    class Channel:
        def __getattr__(self, kind: str):
            def register(path: str, **_kwargs: object) -> None:
                calls[path] = kind

            return register

    grpc_service_pb2_grpc.GRPCInferenceServiceStub(Channel())
    methods = _file(triton["grpc_service"]).service[0].method
    assert set(calls) == {f"/inference.GRPCInferenceService/{m.name}" for m in methods}
    assert calls["/inference.GRPCInferenceService/ModelStreamInfer"] == "stream_stream"
    assert calls["/inference.GRPCInferenceService/ModelInfer"] == "unary_unary"


def test_grpc_service_messages_match_triton_field_for_field(triton: dict) -> None:
    ours = _file(grpc_service_pb2.DESCRIPTOR.serialized_pb)
    mismatches, omitted = _compare(ours, _file(triton["grpc_service"]))
    assert mismatches == []
    assert omitted == []
    assert list(ours.dependency) == ["defcnn/protos/model_config.proto"]


def test_model_config_matches_triton_field_for_field(triton: dict) -> None:
    mismatches, omitted = _compare(
        _file(model_config_pb2.DESCRIPTOR.serialized_pb), _file(triton["model_config"])
    )
    assert mismatches == []
    assert set(omitted) == MODEL_CONFIG_OMITTED


def test_triton_decodes_our_request(triton: dict) -> None:
    assert triton["request"] == {
        "modelName": "digits-def",
        "modelVersion": "1",
        "id": "7",
        "parameters": {"priority": {"uint64Param": "2"}, "sequence_start": {"boolParam": True}},
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": ["1", "3"],
                "contents": {"fp32Contents": [0.5, 1.0, -2.0]},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": {"int64Param": "3"}}}],
        "rawInputContents": [base64.b64encode(b"\x00\x01\x02").decode()],
    }


# ------------------------------------------------------------ model config


def test_exporter_config_parses_into_our_model_config() -> None:
    config = text_format.Parse(EXPORTER_CONFIG, model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (
        "digits-def",
        "onnxruntime_onnx",
        64,
    )
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    (tensor,) = config.input
    assert (tensor.name, tensor.data_type, list(tensor.dims)) == (
        "input",
        model_config_pb2.TYPE_FP32,
        [3, 32, 32],
    )
    (output,) = config.output
    assert (output.name, output.data_type, list(output.dims), output.label_filename) == (
        "logits",
        model_config_pb2.TYPE_FP32,
        [10],
        "labels.txt",
    )
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert (group.count, group.kind) == (1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    # and it survives the trip through ModelConfigResponse, as the server will send it
    response = grpc_service_pb2.ModelConfigResponse(config=config)
    assert grpc_service_pb2.ModelConfigResponse.FromString(response.SerializeToString()) == response
