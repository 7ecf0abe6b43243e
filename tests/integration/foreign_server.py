"""A third-party Open Inference Protocol endpoint for tests: a KServe `ModelServer` serving
an ONNX model through ONNX Runtime, REST and gRPC, on loopback ports chosen by the kernel.

Run as a script only (`python foreign_server.py CONFIG.json`), never imported by pytest:
kserve's generated protos register the same `inference.*` protobuf names as ours, and a
process can hold only one of them. The fixture that starts it is `foreign` in conftest.py.

CONFIG.json (all but `onnx`, `name` and `ready_file` optional):
  onnx        the model: float32 NCHW images in [0, 1] -> logits [N, C]
  name        the served model name
  ready_file  where to write {"http_port": ..., "grpc_port": ...} once both are bound
  datatype    "FP32" (default) or "UINT8" (pixels 0..255, divided by 255 before the model)
  layout      "NCHW" (default) or "NHWC" (transposed to NCHW before the model)
  output      "logits" (default), "probabilities" (softmax) or "label" (INT64 [N], argmax)
  input_name, output_name   the tensor names in metadata ("input", "output" by default)
  json_only   answer REST with JSON `data` lists even when binary outputs are asked for
              (as a model that builds its InferResponse by hand does)
  record_dir  save each request's input tensor, as received, to RECORD_DIR/NNNNNNNN.npy
              (numbered in arrival order), so tests can see exactly what was sent

KServe binds 0.0.0.0 and [::] on fixed ports; here both bind 127.0.0.1 on port 0 instead
(the REST socket is bound before uvicorn starts, the gRPC port is asked of grpc), so tests
need no free-port guess and nothing listens beyond loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def _write_ready(path: str, ports: dict[str, int]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(ports))
    os.replace(tmp, path)


def _loopback(ready_file: str) -> None:
    """Make KServe's REST and gRPC servers listen on 127.0.0.1, port 0, and report the ports."""
    import grpc.aio
    from kserve.protocol.rest import server as rest_server

    http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    http.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http.bind(("127.0.0.1", 0))
    ports = {"http_port": http.getsockname()[1]}
    serve = rest_server._RefreshingServer.serve

    async def serve_on_loopback(self: Any, sockets: Any = None) -> None:
        await serve(self, sockets=[http])

    rest_server._RefreshingServer.serve = serve_on_loopback
    make_server = grpc.aio.server

    def loopback_server(*args: Any, **kwargs: Any) -> Any:
        server = make_server(*args, **kwargs)
        add_port = server.add_insecure_port

        def add_loopback_port(_address: str) -> int:
            ports["grpc_port"] = add_port("127.0.0.1:0")
            _write_ready(ready_file, ports)
            return ports["grpc_port"]

        server.add_insecure_port = add_loopback_port
        return server

    grpc.aio.server = loopback_server


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    import kserve
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse

    datatype, layout = cfg.get("datatype", "FP32"), cfg.get("layout", "NCHW")
    kind, json_only = cfg.get("output", "logits"), bool(cfg.get("json_only", False))
    record = Path(cfg["record_dir"]) if cfg.get("record_dir") else None
    input_name, output_name = cfg.get("input_name", "input"), cfg.get("output_name", "output")
    if datatype not in ("FP32", "UINT8") or layout not in ("NCHW", "NHWC"):
        raise SystemExit(f"unsupported datatype/layout {datatype}/{layout}")
    if kind not in ("logits", "probabilities", "label"):
        raise SystemExit(f"unsupported output {kind}")

    class OnnxModel(kserve.Model):
        def __init__(self) -> None:
            super().__init__(cfg["name"])
            providers = ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(cfg["onnx"], providers=providers)
            model_input = self.session.get_inputs()[0]
            self.onnx_input = model_input.name
            self.chw = [int(d) for d in model_input.shape[1:]]
            self.classes = int(self.session.get_outputs()[0].shape[-1])
            self.ready = True
            self.received = itertools.count()  # next() is atomic: safe across threads

        def _record(self, x: np.ndarray) -> None:
            if record is None:
                return
            record.mkdir(parents=True, exist_ok=True)
            path = record / f"{next(self.received):08d}.npy"
            part = path.with_name(f"{path.name}.part")
            with part.open("wb") as fh:
                np.save(fh, x, allow_pickle=False)
            os.replace(part, path)  # readers see whole files only

        def get_input_types(self) -> list[dict[str, Any]]:
            c, h, w = self.chw
            shape = [-1, c, h, w] if layout == "NCHW" else [-1, h, w, c]
            return [{"name": input_name, "datatype": datatype, "shape": shape}]

        def get_output_types(self) -> list[dict[str, Any]]:
            if kind == "label":
                return [{"name": output_name, "datatype": "INT64", "shape": [-1]}]
            return [{"name": output_name, "datatype": "FP32", "shape": [-1, self.classes]}]

        def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            self._record(x)
            if datatype == "UINT8":
                x = x.astype(np.float32) / 255.0
            if layout == "NHWC":
                x = x.transpose(0, 3, 1, 2)
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = self.session.run(None, {self.onnx_input: x})[0].astype(np.float32)
            if kind == "probabilities":
                exp = np.exp(out - out.max(axis=1, keepdims=True))
                out = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
            elif kind == "label":
                out = out.argmax(axis=1).astype(np.int64)
            dtype = "INT64" if kind == "label" else "FP32"
            # As kserve.utils.get_predict_response builds it; json_only drops what the
            # request asked for (binary outputs, per output or for all), as hand-made ones do.
            binary = payload.use_binary_outputs and not json_only
            tensor = InferOutput(name=output_name, shape=list(out.shape), datatype=dtype)
            tensor.set_data_from_numpy(out, binary_data=binary)
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                infer_outputs=[tensor], use_binary_outputs=binary,
                requested_outputs=None if json_only else payload.request_outputs,
            )  # fmt: skip

    _loopback(cfg["ready_file"])
    kserve.ModelServer(workers=1, enable_docs_url=False, grace_period=2).start([OnnxModel()])


if __name__ == "__main__":
    main(sys.argv[1])
