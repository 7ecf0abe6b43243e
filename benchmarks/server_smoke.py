"""Smoke-check `defcnn serve` under another Python: the batch window and the drain.

The server needs no torch, so the base install (no extras) runs it under an interpreter
without a torch wheel (Python 3.10 here):

    python3.10 -m venv /tmp/py310 && /tmp/py310/bin/pip install -e .
    /tmp/py310/bin/python benchmarks/server_smoke.py REPO MODEL

REPO is a repository written by `defcnn export`, MODEL one of its models. Checks, printing
each: three requests that wait out a 0.3 s batch window are answered; an idle stream ends
with UNAVAILABLE on SIGTERM; the server exits 0. Exit code 0 only if all three hold.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

from defcnn.errors import DefcnnError
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import local_server


def request(model: str, i: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, id=str(i))
    r.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    x = np.random.default_rng(i).random((1, 3, 32, 32), dtype=np.float32)
    r.raw_input_contents.append(x.tobytes())
    return r


async def exercise(address: str, model: str, proc: subprocess.Popen[bytes]) -> list[bool]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            calls = [stub.ModelInfer(request(model, i), timeout=10) for i in range(3)]
            answered = [r.id for r in await asyncio.gather(*calls)] == ["0", "1", "2"]
        except grpc.aio.AioRpcError as exc:
            print(f"batch window: {exc.code().name} {exc.details()}")
            answered = False
        print(f"batch window: answered {answered}")
        stream = stub.ModelStreamInfer(timeout=15)
        try:
            await stream.write(request(model, 9))
            await stream.read()
        except grpc.aio.AioRpcError as exc:
            print(f"stream: {exc.code().name} {exc.details()}")
        proc.send_signal(signal.SIGTERM)
        try:
            await stream.read()
            ended = False
        except grpc.aio.AioRpcError as exc:
            ended = exc.details() == "the server is shutting down"
        print(f"idle stream ended with UNAVAILABLE on SIGTERM: {ended}")
        return [answered, ended]


def main() -> int:
    repo, model = Path(sys.argv[1]), sys.argv[2]
    extra = ["--max-queue-delay-us", "300000"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with local_server(repo, Path(tmp) / "serve.log", extra=extra, grace_s=20) as server:
                print(f"Python {sys.version.split()[0]}, server on {server.url}")
                checks = asyncio.run(exercise(server.url, model, server.process))
                code = server.stop(timeout_s=30)  # SIGTERM was sent: this waits for the exit
        except DefcnnError as exc:
            print(exc)
            return 1
    print(f"exit code {code}")
    return 0 if all(checks) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
