"""The Open Inference Protocol's REST binding (KServe v2, Triton's HTTP port) for the client.

`RestTransport` takes and returns the gRPC protobuf messages (see `transport.py`), so the
client above it does not know which wire it is on. The JSON <-> protobuf conversion is
here, in functions free of sockets (`encode_infer`, `decode_infer`, `error_for`).

Tensors travel with the binary tensor data extension that Triton and KServe implement:
the request body is the JSON header followed by each input's raw bytes (the header's length
in `Inference-Header-Content-Length`, each input's in `binary_data_size`), and outputs are
asked for with `binary_data: true`. A server that answers with JSON `data` lists instead
(no binary part) is read as well. Protocol:
https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import ssl
import struct
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import numpy as np
from google.protobuf import json_format

from defcnn.client.client import _Settings
from defcnn.client.transport import Metadata
from defcnn.errors import ConfigError
from defcnn.protos import grpc_service_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"

# HTTP status -> the gRPC status the rest of the client branches on (Google's API mapping);
# UNAVAILABLE is the one `_Attempts` retries.
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,  # a proxy whose backend is restarting
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Numeric datatypes as little-endian numpy dtypes, for JSON `data` lists.
_NUMPY = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip

# InferTensorContents' field for each datatype (requests built without raw contents).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


class RestError(grpc.RpcError):
    """A failed REST call, spelt as the gRPC error the client already handles."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def error_for(status: int, body: bytes) -> RestError:
    """The error for a non-2xx answer; the message is the body's `error` (Triton, KServe)
    or `detail` (FastAPI) field, else the start of the body."""
    if status in STATUS:
        code = STATUS[status]
    else:
        code = grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN
    text = body[:1000].decode("utf-8", "replace")
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and ("error" in doc or "detail" in doc):
            text = str(doc.get("error") or doc.get("detail"))
    except ValueError:
        pass
    return RestError(code, f"HTTP {status}: {text or 'no message'}")


def _parameters(params: Any) -> dict[str, Any]:
    """Protobuf InferParameter map -> JSON object."""
    out = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(param, kind)
    return out


def _set_parameters(target: Any, params: dict[str, Any]) -> None:
    """JSON object -> protobuf InferParameter map (values of other types are dropped)."""
    for key, value in params.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value


def _contents(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    """An input sent as typed contents, as a JSON `data` list."""
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise ValueError(f"input {tensor.name!r}: {tensor.datatype} needs raw contents")
    values = list(getattr(tensor.contents, field))
    return [v.decode("utf-8") for v in values] if tensor.datatype == "BYTES" else values


def encode_infer(request: pb.ModelInferRequest) -> tuple[bytes, int | None]:
    """The body of POST .../infer and, when inputs go as binary, its JSON header's length."""
    inputs = []
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ValueError(f"{len(request.inputs)} inputs but {len(raw)} raw contents")
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
        }  # fmt: skip
        params = _parameters(tensor.parameters)
        if raw:
            params["binary_data_size"] = len(raw[i])
        else:
            entry["data"] = _contents(tensor)
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    # Binary outputs asked for both ways, per output and for all: servers read either.
    header: dict[str, Any] = {
        "parameters": {**_parameters(request.parameters), "binary_data_output": True},
        "inputs": inputs,
    }
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {**_parameters(o.parameters), "binary_data": True}}
            for o in request.outputs
        ]
    head = json.dumps(header, separators=(",", ":")).encode()
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)


def _bytes_raw(data: list[Any]) -> bytes:
    """JSON BYTES elements in Triton's raw layout (4-byte little-endian length, then bytes)."""
    parts = []
    for item in data:
        value = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(value)), value]
    return b"".join(parts)


def _json_raw(datatype: str, shape: list[int], data: Any) -> bytes:
    """A JSON `data` list (flat or nested, row-major) as raw little-endian contents."""
    if datatype == "BYTES":
        return _bytes_raw(list(np.asarray(data, dtype=object).ravel()))
    if datatype not in _NUMPY:
        raise ValueError(f"cannot read {datatype} from JSON data")
    array = np.asarray(data, dtype=_NUMPY[datatype]).ravel()
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{array.size} values for shape {shape}")
    return array.tobytes()


def decode_infer(body: bytes, header_length: int | None) -> pb.ModelInferResponse:
    """The protobuf response, each output's bytes in `raw_output_contents` (as over gRPC)."""
    end = len(body) if header_length is None else header_length
    if not 0 <= end <= len(body):
        raise ValueError(f"{HEADER_LENGTH} {header_length} exceeds the body's {len(body)} bytes")
    doc = json.loads(body[:end])
    response = pb.ModelInferResponse(
        model_name=doc.get("model_name") or "", model_version=doc.get("model_version") or "",
        id=doc.get("id") or "",
    )  # fmt: skip
    _set_parameters(response.parameters, doc.get("parameters") or {})
    offset = end
    for out in doc.get("outputs") or []:
        params = dict(out.get("parameters") or {})
        size = params.pop("binary_data_size", None)
        shape = [int(d) for d in out["shape"]]
        tensor = response.outputs.add(name=out["name"], datatype=out["datatype"], shape=shape)
        _set_parameters(tensor.parameters, params)
        if size is None:
            raw = _json_raw(out["datatype"], shape, out.get("data", []))
        else:
            if offset + int(size) > len(body):
                raise ValueError(f"output {out['name']!r}: binary data cut short")
            raw, offset = body[offset : offset + int(size)], offset + int(size)
        response.raw_output_contents.append(raw)
    return response


def _without_nulls(value: Any) -> Any:
    """JSON with null members removed (protobuf's parser refuses null in most fields)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _message(body: bytes, message: Any) -> Any:
    json_format.ParseDict(_without_nulls(json.loads(body)), message, ignore_unknown_fields=True)
    return message


def ssl_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verify with `ca` (else the certifi roots httpx ships with); present `cert` if given."""
    try:
        context = ssl.create_default_context(cafile=ca) if ca else httpx.create_ssl_context()
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files {ca}, {cert}, {key}: {exc}") from exc
    return context


class RestTransport:
    """httpx over HTTP/1.1 with a keep-alive pool as large as the client's concurrency."""

    def __init__(self, settings: _Settings) -> None:
        assert settings.rest_url is not None
        self._max = settings.max_message
        verify: ssl.SSLContext | bool = True
        if settings.rest_url.startswith("https://"):
            verify = ssl_context(*settings.tls_files)
        n = settings.concurrency
        self._http = httpx.Client(
            base_url=settings.rest_url, verify=verify, timeout=settings.timeout,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )  # fmt: skip

    @staticmethod
    def _path(name: str, version: str) -> str:
        path = f"/v2/models/{quote(name, safe='')}"
        return f"{path}/versions/{quote(version, safe='')}" if version else path

    def _send(
        self, method: str, path: str, timeout: float, metadata: Metadata,
        content: bytes | None = None, headers: dict[str, str] | None = None,
    ) -> tuple[bytes, httpx.Headers]:  # fmt: skip
        """The body of a 2xx answer; anything else raises RestError."""
        all_headers = {**dict(metadata), **(headers or {})}
        try:
            with self._http.stream(
                method, path, content=content, headers=all_headers, timeout=timeout
            ) as r:
                length = r.headers.get("content-length", "")
                if length.isascii() and length.isdigit() and int(length) > self._max:
                    raise self._too_large(int(length))
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > self._max:
                        raise self._too_large(len(body))
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise RestError(grpc.StatusCode.UNAVAILABLE, f"cannot connect: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise RestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"timed out: {exc!r}") from exc
        except (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError, httpx.ProxyError) as exc:  # fmt: skip
            raise RestError(grpc.StatusCode.UNAVAILABLE, f"connection failed: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise RestError(grpc.StatusCode.INTERNAL, f"HTTP request failed: {exc!r}") from exc
        if not 200 <= r.status_code < 300:
            raise error_for(r.status_code, bytes(body))
        return bytes(body), r.headers

    def _too_large(self, size: int) -> RestError:
        return RestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"response of {size} bytes exceeds the limit of {self._max} (max_message_mb)",
        )

    @staticmethod
    def _parsed(parse: Any, *args: Any) -> Any:
        try:
            return parse(*args)
        except (ValueError, KeyError, TypeError, json_format.ParseError) as exc:
            raise RestError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from exc

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelMetadataResponse:
        body, _ = self._send("GET", self._path(request.name, request.version), timeout, metadata)
        return self._parsed(_message, body, pb.ModelMetadataResponse())

    def ModelConfig(
        self, request: pb.ModelConfigRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelConfigResponse:
        """Triton's GET .../config; a server without the route (KServe) answers UNIMPLEMENTED,
        as its gRPC port does."""
        path = self._path(request.name, request.version) + "/config"
        try:
            body, _ = self._send("GET", path, timeout, metadata)
        except RestError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise RestError(grpc.StatusCode.UNIMPLEMENTED, exc.details()) from exc
            raise
        response = pb.ModelConfigResponse()
        self._parsed(_message, body, response.config)
        return response

    def ModelInfer(
        self, request: pb.ModelInferRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelInferResponse:
        content, header_length = self._parsed(encode_infer, request)
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       HEADER_LENGTH: str(header_length)}  # fmt: skip
        path = self._path(request.model_name, request.model_version) + "/infer"
        body, answer = self._send("POST", path, timeout, metadata, content, headers)
        length = answer.get(HEADER_LENGTH)
        return self._parsed(lambda: decode_infer(body, None if length is None else int(length)))

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, *, timeout: float, metadata: Metadata
    ) -> pb.ModelStatisticsResponse:
        path = self._path(request.name, request.version) + "/stats"
        body, _ = self._send("GET", path, timeout, metadata)
        return self._parsed(_message, body, pb.ModelStatisticsResponse())

    def close(self) -> None:
        self._http.close()
