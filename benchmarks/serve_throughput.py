"""Serving throughput and latency: our server vs in-process ONNX Runtime vs Triton.

Closed loop: C clients each send one image per request and send the next when the answer
arrives, for a fixed time; throughput is answers per second, with p50/p99 latency. Same
run, same ONNX model (a full-width CIFAR ResNet-18, defective keep 0.1, random weights:
speed does not depend on them), same machine, side by side:

- in-process ONNX Runtime, one caller, at batch 1 and at its best batch size (the ceiling);
- `defcnn serve` (KServe v2 gRPC) driven by a grpc.aio client in this process;
- NVIDIA Triton Inference Server from the nvidia-pytriton wheel, with an ONNX Runtime
  session inside, driven by the same client over the same protocol (needs a separate
  virtual environment with numpy<2: --pytriton-python PATH).

    python benchmarks/serve_throughput.py --pytriton-python /tmp/pytriton-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import torch
from _machine import machine

from defcnn.checkpoint import save_checkpoint
from defcnn.export.exporter import ExportSettings, export
from defcnn.models import ModelSpec, create_model
from defcnn.names import MODEL_FILE
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import local_server

PYTRITON_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
path, grpc_port, http_port, metrics_port = sys.argv[1], *map(int, sys.argv[2:5])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

@batch
def infer(input):
    return {"logits": session.run(["logits"], {"input": input})[0]}

config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
with Triton(config=config) as triton:
    triton.bind(
        model_name="bench", infer_func=infer,
        inputs=[Tensor(name="input", dtype=np.float32, shape=(3, 32, 32))],
        outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
        config=ModelConfig(
            max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)
        ),
    )
    print("TRITON READY", flush=True)
    triton.serve()
"""


def build_repo(root: Path) -> Path:
    """A model repository holding the benchmark model, exported as `defcnn export` does."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet18", defective=True, keep_prob=0.1)
    ckpt = root / "bench.safetensors"
    save_checkpoint(ckpt, create_model(spec), spec, {"classes": [str(i) for i in range(10)]})
    repo = root / "repo"
    export(ExportSettings(str(ckpt), str(repo), "bench", max_batch_size=64, dataset="digits"))
    return repo


def in_process(model: Path, seconds: float) -> dict[int, float]:
    """Images/s of one caller at batch 1, 16 and 64."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rates = {}
    for b in (1, 16, 64):
        x = np.random.default_rng(0).random((b, 3, 32, 32), dtype=np.float32)
        session.run(None, {"input": x})
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {"input": x})
            n += b
        rates[b] = n / (time.perf_counter() - start)
    return rates


async def closed_loop(address: str, model: str, concurrency: int, seconds: float) -> dict:
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            await stub.ModelInfer(request)
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await stub.ModelInfer(request)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "images_per_second": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests": len(lat),
    }


def start_triton(python: str, model: Path, home: Path) -> tuple[subprocess.Popen, str]:
    ports = [18101, 18100, 18102]
    env = {**os.environ, "PYTRITON_HOME": str(home)}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
    script = home / "serve_pytriton.py"
    script.write_text(textwrap.dedent(PYTRITON_SCRIPT))
    proc = subprocess.Popen(
        [python, str(script), str(model), *map(str, ports)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if "TRITON READY" in line:
            return proc, f"127.0.0.1:{ports[0]}"
        if not line and proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("pytriton did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--pytriton-python", help="python of a venv with nvidia-pytriton, numpy<2")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repo = build_repo(Path(tmp))
        model = repo / "bench" / "1" / MODEL_FILE
        result: dict = {"machine": machine(), "onnxruntime": ort.__version__,
                        "grpcio": grpc.__version__, "seconds": args.seconds}  # fmt: skip
        result["in_process"] = in_process(model, args.seconds)
        ours = stack.enter_context(local_server(repo, Path(tmp) / "defcnn-serve.log"))
        servers = {"defcnn": (ours.process, ours.url)}
        if args.pytriton_python:
            servers["triton"] = start_triton(args.pytriton_python, model, Path(tmp))
        try:
            for name, (_, address) in servers.items():
                model_name = "bench"
                result[name] = {
                    c: asyncio.run(closed_loop(address, model_name, c, args.seconds))
                    for c in args.concurrency
                }
        finally:
            if "triton" in servers:  # its own session: tritonserver is a grandchild
                proc = servers["triton"][0]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            # the launcher stops our server when the `with` ends

    best = max(result["in_process"].values())
    print(f"machine: {result['machine']} | onnxruntime {ort.__version__}")
    print("in-process ONNX Runtime img/s: " + ", ".join(
        f"batch {b}: {r:.1f}" for b, r in result["in_process"].items()))  # fmt: skip
    header = (
        f"{'server':<8}{'conc':>5}{'img/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'/ort b1':>8}{'/best':>7}"
    )
    print(header)
    for name in servers:
        for c, r in result[name].items():
            print(
                f"{name:<8}{c:>5}{r['images_per_second']:>8.1f}{r['p50_ms']:>8.1f}"
                f"{r['p99_ms']:>8.1f}{r['images_per_second'] / result['in_process'][1]:>8.2f}"
                f"{r['images_per_second'] / best:>7.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
