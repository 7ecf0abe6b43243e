"""Export: masks folded into constant Muls, parity, metadata, Triton config, versions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from defcnn.checkpoint import load_checkpoint, load_model
from defcnn.cli import EXIT_ERROR, EXIT_USAGE, main
from defcnn.errors import ConfigError, ExportError
from defcnn.export.exporter import ExportReport, ExportSettings, export, summary
from defcnn.export.onnx_graph import mask_muls, read_metadata
from defcnn.export.tensorrt_engine import check_engine
from defcnn.export.verify import cuda_parity, cuda_session, parity_cases
from defcnn.names import CONFIG_FILE, LABELS_FILE, engine_name, parse_engine_name
from defcnn.training import TrainConfig, train

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _train(out: Path, defective: bool) -> Path:
    cfg = TrainConfig(
        arch="resnet18", width=0.125, defective=defective, keep_prob=0.3, dataset="digits",
        epochs=1, max_steps=3, schedule="fast", seed=1, out=str(out),
    )  # fmt: skip
    train(cfg, progress=False)
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"defective": _train(root / "def", True), "standard": _train(root / "std", False)}


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for kind, ckpt in checkpoints.items():
        export(
            ExportSettings(
                checkpoint=str(ckpt),
                repo=str(repo),
                name=kind,
                max_batch_size=16,
                max_queue_delay_us=500,
            )
        )
    return repo


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def test_every_mask_is_one_constant_mul_equal_to_the_checkpoint(
    checkpoints: dict[str, Path], exported: Path
) -> None:
    graph = onnx.load(str(exported / "defective" / "1" / "model.onnx")).graph
    masks = {k: v for k, v in load_checkpoint(checkpoints["defective"]).state_dict.items()
             if k.endswith("mask")}  # fmt: skip
    found = mask_muls(graph)
    assert len(found) == len(masks) == 10
    for _node, tensor in found:
        values = numpy_helper.to_array(tensor)
        assert tensor.name in masks
        assert np.array_equal(values, masks[tensor.name].numpy())  # same zeros, same places
        assert values.shape[0] == 1 and set(np.unique(values)) <= {0.0, 1.0}
    standard = onnx.load(str(exported / "standard" / "1" / "model.onnx")).graph
    assert mask_muls(standard) == []
    assert not [n for n in standard.node if n.op_type == "Mul"]


def test_masks_are_live_in_the_graph(exported: Path) -> None:
    model = onnx.load(str(exported / "defective" / "1" / "model.onnx"))
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    before = _run(model, x)
    for _node, tensor in mask_muls(model.graph):
        tensor.CopyFrom(
            numpy_helper.from_array(np.ones_like(numpy_helper.to_array(tensor)), tensor.name)
        )
    assert np.abs(_run(model, x) - before).max() > 1e-3


def test_graph_interface_and_folding(exported: Path, checkpoints: dict[str, Path]) -> None:
    model = onnx.load(str(exported / "defective" / "1" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # dynamic batch
    torch_model, _ = load_model(checkpoints["defective"])
    x = np.random.default_rng(1).random((5, 3, 32, 32), dtype=np.float32)  # batch not traced
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    assert np.abs(_run(model, x) - expected).max() <= 1e-4


def test_metadata_records_provenance(exported: Path, checkpoints: dict[str, Path]) -> None:
    meta = read_metadata(onnx.load(str(exported / "defective" / "1" / "model.onnx")))
    ckpt = load_checkpoint(checkpoints["defective"])
    assert meta["arch"] == "resnet18"
    assert json.loads(meta["keep_prob"]) == 0.3
    assert json.loads(meta["mask_seed"]) == ckpt.spec.mask_seed == 1
    assert json.loads(meta["classes"]) == ckpt.classes
    assert json.loads(meta["normalization"])["std"] == pytest.approx([0.2023, 0.1994, 0.2010])
    digest = hashlib.sha256(checkpoints["defective"].read_bytes()).hexdigest()
    assert meta["source_checkpoint_sha256"] == digest
    assert {"torch", "onnx", "onnxruntime"} <= set(json.loads(meta["exporter"]))


def test_verification_report_is_saved_beside_the_model(exported: Path) -> None:
    report = json.loads((exported / "defective" / "1" / "verification.json").read_text())
    assert report["masks"]["count"] == 10
    cases = {r["case"]: r for r in report["parity"]}
    assert {"random batch 1", "random batch 16", "real batch 1", "real batch 16"} == set(cases)
    assert all(r["passed"] and r["max_abs_diff"] <= 1e-4 for r in cases.values())


def test_config_parses_as_a_triton_model_config(exported: Path) -> None:
    # Parsed with Triton's own schema in a subprocess: tritonclient's model_config_pb2 and
    # defcnn.protos.model_config_pb2 both define inference.ModelConfig, which cannot share
    # protobuf's default descriptor pool in one process.
    script = """
import json, sys
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

config = text_format.Parse(open(sys.argv[1]).read(), mc.ModelConfig())
print(json.dumps({
    "name": config.name,
    "platform": config.platform,
    "max_batch_size": config.max_batch_size,
    "input_dims": list(config.input[0].dims),
    "input_data_type": mc.DataType.Name(config.input[0].data_type),
    "output_dims": list(config.output[0].dims),
    "label_filename": config.output[0].label_filename,
    "preferred_batch_size": list(config.dynamic_batching.preferred_batch_size),
    "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds,
    "instance_kind": mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind),
    "version_policy_all": config.version_policy.HasField("all"),
}))
"""
    path = exported / "defective" / "config.pbtxt"
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["name"] == "defective" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16
    assert config["input_dims"] == [3, 32, 32]
    assert config["input_data_type"] == "TYPE_FP32"
    assert config["output_dims"] == [10] and config["label_filename"] == "labels.txt"
    assert config["preferred_batch_size"][-1] == 16
    assert config["max_queue_delay_microseconds"] == 500
    assert config["instance_kind"] == "KIND_AUTO"
    assert config["version_policy_all"]
    labels = (exported / "defective" / "labels.txt").read_text().splitlines()
    assert labels == [str(i) for i in range(10)]


def test_config_parses_back_into_the_servers_model_config(exported: Path) -> None:
    from google.protobuf import text_format

    from defcnn.export.triton_config import TritonModelConfig
    from defcnn.protos import model_config_pb2 as mc
    from defcnn.server.repository import parse_config

    path = exported / "defective" / CONFIG_FILE
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert config == parse_config(path.read_text())  # the server reads it the same way
    assert (config.name, config.platform, config.max_batch_size) == (
        "defective",
        "onnxruntime_onnx",
        16,
    )
    assert config.version_policy.HasField("all")
    [inp], [out] = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", mc.TYPE_FP32, [3, 32, 32])
    assert (out.name, out.data_type, list(out.dims)) == ("logits", mc.TYPE_FP32, [10])
    assert out.label_filename == LABELS_FILE
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = config.instance_group
    assert (group.count, group.kind) == (1, mc.ModelInstanceGroup.KIND_AUTO)

    custom = TritonModelConfig(
        name="m", input_size=64, num_classes=3, max_batch_size=8, platform="tensorrt_plan",
        max_queue_delay_us=0, instance_count=2, preferred=[2, 8],
    )  # fmt: skip
    parsed = text_format.Parse(custom.to_pbtxt(), mc.ModelConfig())
    assert parsed == custom.to_model_config()
    assert parsed.platform == "tensorrt_plan" and list(parsed.input[0].dims) == [3, 64, 64]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [2, 8]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 0
    assert parsed.instance_group[0].count == 2


def test_new_versions_leave_old_ones_intact(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    settings = ExportSettings(
        checkpoint=str(checkpoints["defective"]), repo=str(tmp_path), name="m"
    )
    report = export(settings)
    first = (tmp_path / "m" / "1" / "model.onnx").read_bytes()
    # the report is a type; verification.json is its to_dict, and reads back to the same
    saved = json.loads((tmp_path / "m" / "1" / "verification.json").read_text())
    assert ExportReport.from_dict(saved) == report
    assert saved["version"] == report.version == 1 and "tensorrt" not in saved
    text = summary(report)
    assert "exported m version 1" in text and "argmax identical" in text
    assert "None" not in text and "{" not in text and "True" not in text
    assert export(settings).version == 2
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == first
    with pytest.raises(ExportError, match="immutable"):
        export(
            ExportSettings(
                checkpoint=str(checkpoints["defective"]), repo=str(tmp_path), name="m", version=1
            )
        )
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "1",
        "2",
        "config.pbtxt",
        "labels.txt",
    ]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is usable here, so --tensorrt would succeed")
def test_failed_export_leaves_no_half_written_version(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = ExportSettings(
        checkpoint=str(checkpoints["defective"]), repo=str(tmp_path), name="m", tensorrt=True
    )
    with pytest.raises(ExportError, match=r"tensorrt|GPU"):
        export(settings)  # fails inside the staging folder, after model.onnx was written there
    assert list((tmp_path / "m").iterdir()) == []


def test_cli_export_and_its_errors(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(checkpoints["standard"])
    assert main(["export", ckpt, "--repo", str(tmp_path), "--name", "std"]) == 0
    assert "parity" in capsys.readouterr().out
    assert main(["export", ckpt, "--repo", str(tmp_path), "--name", "../escape"]) == EXIT_USAGE
    assert "model name" in capsys.readouterr().err
    assert main(["export", ckpt, "--repo", str(tmp_path), "--name", "x", "--fp16"]) == EXIT_USAGE
    if not HAS_TENSORRT:
        code = main(["export", ckpt, "--repo", str(tmp_path), "--name", "t", "--tensorrt"])
        assert code == EXIT_ERROR
        assert "tensorrt" in capsys.readouterr().err.lower()
    evil = tmp_path / "evil.pt"
    torch.save({"x": 1}, evil)
    assert main(["export", str(evil), "--repo", str(tmp_path), "--name", "e"]) == EXIT_ERROR
    assert not (tmp_path / "e").exists()


def test_engine_names_bind_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    name = engine_name((9, 0), "10.8.0", "fp16")
    assert name == "model.sm90.trt10.8.0.fp16.plan"
    assert parse_engine_name(name) == {"sm": "90", "trt": "10.8.0", "precision": "fp16"}
    check_engine(tmp_path / name, (9, 0), "10.8.0")
    with pytest.raises(ExportError, match=r"sm90 with TensorRT 10\.8\.0.*sm80"):
        check_engine(tmp_path / name, (8, 0), "10.8.0")
    with pytest.raises(ExportError, match=r"TensorRT 11\.0"):
        check_engine(tmp_path / name, (9, 0), "11.0")
    with pytest.raises(ConfigError):
        ExportSettings(checkpoint="c", repo="r", name="a/b")


HAS_CUDA_ORT = torch.cuda.is_available() and "CUDAExecutionProvider" in (
    ort.get_available_providers()
)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_ORT, reason="needs a CUDA GPU and onnxruntime-gpu")
def test_cuda_parity_onnx_runtime_cuda_matches_pytorch_cuda(
    exported: Path, checkpoints: dict[str, Path]
) -> None:
    model, _ = load_model(checkpoints["defective"])
    onnx_bytes = (exported / "defective" / "1" / "model.onnx").read_bytes()
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    results = cuda_parity(onnx_bytes, model, parity_cases((x * 255).astype(np.uint8), 32, 16))
    assert all(r.passed for r in results), [r.line() for r in results]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_parity_without_a_gpu_is_an_error_never_a_cpu_pass(exported: Path) -> None:
    onnx_bytes = (exported / "defective" / "1" / "model.onnx").read_bytes()
    model = torch.nn.Identity()
    with pytest.raises(ExportError, match="needs a CUDA device"):
        cuda_parity(onnx_bytes, model, [])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu here: the provider is listed, cannot start, and ONNX Runtime would
        # run the session on the CPU; that is refused, not taken for a CUDA session.
        with pytest.raises(ExportError, match="did not start"):
            cuda_session(onnx_bytes)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engines_fp32_and_fp16_match_onnx_runtime(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = ExportSettings(
        checkpoint=str(checkpoints["defective"]), repo=str(tmp_path), name="trt",
        tensorrt=True, fp16=True,
    )  # fmt: skip
    report = export(settings)
    assert report.tensorrt is not None
    assert {e.precision for e in report.tensorrt} == {"fp32", "fp16"}
    assert all(e.argmax_agreement >= 0.999 for e in report.tensorrt)


def test_an_exported_repository_is_readable_by_another_user(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A Triton container running as non-root reads what we export: under the usual umask,
    files are 0644 and folders 0755 (temp files and staging folders start as 0600/0700)."""
    old = os.umask(0o022)
    try:
        export(ExportSettings(checkpoint=str(checkpoints["defective"]), repo=str(tmp_path),
                              name="m", max_batch_size=4))  # fmt: skip
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert Path("m/1") in modes and Path("m/config.pbtxt") in modes
    for path, mode in modes.items():
        expected = 0o755 if (tmp_path / path).is_dir() else 0o644
        assert mode == expected, f"{path}: {oct(mode)}"
