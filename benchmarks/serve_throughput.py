"""Serving throughput and latency: our server vs in-process ONNX Runtime vs Triton vs KServe.

Closed loop: C clients each send one image per request and send the next when the answer
arrives, for a fixed time; throughput is answers per second, with p50/p99 latency. Same
run, same ONNX model (a full-width CIFAR ResNet-18, defective keep 0.1, random weights:
speed does not depend on them), same machine, side by side:

- in-process ONNX Runtime, one caller, at batch 1 and at its best batch size (the ceiling);
- `defcnn serve` (KServe v2 gRPC) driven by a grpc.aio client in this process;
- NVIDIA Triton Inference Server from the nvidia-pytriton wheel, with an ONNX Runtime
  session inside, driven by the same client over the same protocol (needs a separate
  virtual environment with numpy<2: --pytriton-python PATH);
- KServe's Python ModelServer (a `kserve.Model` whose predict runs an ONNX Runtime session
  at batch 1: it has no batching), one worker, its gRPC (Open Inference Protocol) port
  driven by the same client (needs a separate virtual environment: --kserve-python PATH).

Every point is measured --repeats times in interleaved rounds (each round: in-process, then
every server at every concurrency, the servers' order rotating); the table shows medians.
Every answer is checked against in-process ONNX Runtime: a wrong or malformed one fails the run.

    python benchmarks/serve_throughput.py --pytriton-python /tmp/pytriton-venv/bin/python \
        --kserve-python /tmp/kserve-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
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


KSERVE_SCRIPT = """
import logging, sys, onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
path, grpc_port, http_port = sys.argv[1], *map(int, sys.argv[2:4])

class Bench(Model):
    def __init__(self, name):
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.ready = True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        logits = self.session.run(["logits"], {"input": x})[0]
        out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(logits, binary_data=True)  # raw_output_contents over gRPC
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])

server = ModelServer(
    http_port=http_port, grpc_port=grpc_port, workers=1, enable_grpc=True,
    enable_latency_logging=False,
)
logging.getLogger("kserve").setLevel(logging.WARNING)  # no log line per request
server.start([Bench("bench")])
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


def probe(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image every request carries, and its logits from in-process ONNX Runtime."""
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return x, session.run(["logits"], {"input": x})[0]


def check(response: pb.ModelInferResponse, expected: np.ndarray, rtol: float = 1e-3) -> str | None:
    """Why the answer is wrong (None when it is right): "logits", FP32 [1, 10], finite, and
    within `rtol` of `expected` (relative to its largest logit) with the same argmax, sent as
    raw_output_contents or as typed contents."""
    names = [o.name for o in response.outputs]
    if "logits" not in names:
        return f"no logits output: {names}"
    i = names.index("logits")
    out = response.outputs[i]
    shape = [int(d) for d in out.shape]
    if out.datatype != "FP32" or shape != [1, 10]:
        return f"logits {out.datatype} {shape}, expected FP32 [1, 10]"
    if response.raw_output_contents:
        if len(response.raw_output_contents) != len(names):
            return f"{len(names)} outputs but {len(response.raw_output_contents)} raw contents"
        logits = np.frombuffer(response.raw_output_contents[i], dtype="<f4")
    else:
        logits = np.asarray(out.contents.fp32_contents, dtype=np.float32)
    if logits.size != 10:
        return f"{logits.size} values for [1, 10]"
    if not np.isfinite(logits).all():
        return "non-finite logits"
    if np.abs(logits - expected.ravel()).max() > rtol * np.abs(expected).max() + 1e-6:
        return f"logits {logits} differ from in-process {expected.ravel()}"
    if logits.argmax() != expected.argmax():
        return f"argmax {logits.argmax()} differs from in-process {expected.argmax()}"
    return None


async def closed_loop(
    address: str,
    model: str,
    concurrency: int,
    seconds: float,
    x: np.ndarray,
    expected: np.ndarray,
    rtol: float = 1e-3,
) -> dict:
    """Answers/s and latencies of `concurrency` one-image clients; every answer checked."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    wrong: list[str] = []
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            if (why := check(await stub.ModelInfer(request), expected, rtol)) is not None:
                wrong.append(why)
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                response = await stub.ModelInfer(request)
                latencies.append(time.perf_counter() - t)
                if (why := check(response, expected, rtol)) is not None:
                    wrong.append(why)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "images_per_second": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests": len(lat),
        "mismatches": len(wrong),
        "first_mismatch": wrong[0] if wrong else None,
    }


def server_split(address: str, model: str) -> dict[str, int]:
    """Our server's own counters (ModelStatistics): requests, and the nanoseconds they spent
    in all (from the handler's start to its answer), queued, and computing."""
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    s = stats.model_stats[0].inference_stats
    return {"requests": s.success.count, "total_ns": s.success.ns, "queue_ns": s.queue.ns,
            "compute_ns": s.compute_infer.ns}  # fmt: skip


def where_time_goes(before: dict[str, int], after: dict[str, int], p50_ms: float) -> dict:
    """Per request, in ms: the client's p50, and from the server's counters the mean time
    in the server, waiting for a batch, and in the model's batch (shared by its requests)."""
    n = max(1, after["requests"] - before["requests"])
    per = {k: (after[k] - before[k]) / n / 1e6 for k in ("total_ns", "queue_ns", "compute_ns")}
    return {"client_p50_ms": p50_ms, "server_ms": per["total_ns"], "queued_ms": per["queue_ns"],
            "batch_compute_ms": per["compute_ns"]}  # fmt: skip


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


def start_kserve(python: str, model: Path, home: Path) -> tuple[subprocess.Popen, str]:
    """KServe's ModelServer in its own session, once its gRPC port says the model is ready."""
    grpc_port, http_port = 18111, 18110
    script = home / "serve_kserve.py"
    script.write_text(textwrap.dedent(KSERVE_SCRIPT))
    log = home / "kserve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [python, str(script), str(model), str(grpc_port), str(http_port)], stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    address = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                if stub.ModelReady(pb.ModelReadyRequest(name="bench"), timeout=1).ready:
                    return proc, address
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tail = "\n".join(log.read_text().splitlines()[-20:])
    raise RuntimeError(f"kserve did not start (exit {proc.returncode}):\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's session (its children included), SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def only(running: subprocess.Popen | None, servers: dict[str, subprocess.Popen]) -> Iterator[None]:
    """Every server but `running` stopped (SIGSTOP) for the enclosed measurement: an idle
    server is not idle on 2 cores (Triton's polling threads, for one), and would slow
    whatever is measured beside it."""
    paused = [p for p in servers.values() if p is not running]
    for proc in paused:
        _signal_all(proc, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in paused:
            _signal_all(proc, signal.SIGCONT)


def _signal_all(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the server and, when it leads its own session (Triton, KServe), its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def package_version(python: str, package: str) -> str:
    """The version of `package` installed for another interpreter."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def medians(rounds: list[dict], name: str) -> dict[int, dict[str, float]]:
    """Per concurrency, the median of each figure over the rounds."""
    keys = ("images_per_second", "p50_ms", "p99_ms")
    return {
        c: {k: statistics.median(r[name][c][k] for r in rounds) for k in keys}
        for c in rounds[0][name]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians shown")
    p.add_argument("--pytriton-python", help="python of a venv with nvidia-pytriton, numpy<2")
    p.add_argument("--kserve-python", help="python of a venv with kserve and onnxruntime")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repo = build_repo(Path(tmp))
        model = repo / "bench" / "1" / MODEL_FILE
        x, expected = probe(model)
        result: dict = {"machine": machine(), "onnxruntime": ort.__version__,
                        "grpcio": grpc.__version__, "seconds": args.seconds,
                        "repeats": args.repeats}  # fmt: skip
        ours = stack.enter_context(local_server(repo, Path(tmp) / "defcnn-serve.log"))
        servers = {"defcnn": (ours.process, ours.url)}
        external: list[subprocess.Popen] = []
        rounds: list[dict] = []
        try:
            if args.pytriton_python:
                result["nvidia-pytriton"] = package_version(args.pytriton_python, "nvidia-pytriton")
                servers["triton"] = start_triton(args.pytriton_python, model, Path(tmp))
                external.append(servers["triton"][0])
            if args.kserve_python:
                result["kserve"] = package_version(args.kserve_python, "kserve")
                servers["kserve"] = start_kserve(args.kserve_python, model, Path(tmp))
                external.append(servers["kserve"][0])
            names = list(servers)
            procs = {name: proc for name, (proc, _) in servers.items()}
            for i in range(args.repeats):
                with only(None, procs):
                    measured: dict = {"in_process": in_process(model, args.seconds)}
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    address = servers[name][1]
                    measured[name] = {}
                    for c in args.concurrency:
                        with only(procs[name], procs):
                            before = server_split(address, "bench") if name == "defcnn" else None
                            point = asyncio.run(
                                closed_loop(address, "bench", c, args.seconds, x, expected)
                            )
                            if before is not None:
                                point["split"] = where_time_goes(
                                    before, server_split(address, "bench"), point["p50_ms"]
                                )
                        measured[name][c] = point
                rounds.append(measured)
        finally:
            for proc in external:  # their own sessions: tritonserver is a grandchild
                stop(proc)
            # the launcher stops our server when the `with` ends

    result["rounds"] = rounds
    result["in_process"] = {
        b: statistics.median(r["in_process"][b] for r in rounds) for b in rounds[0]["in_process"]
    }
    b1, best = result["in_process"][1], max(result["in_process"].values())
    versions = "".join(f" | {k} {result[k]}" for k in ("nvidia-pytriton", "kserve") if k in result)
    print(f"machine: {result['machine']} | onnxruntime {ort.__version__}{versions}")
    print(f"medians of {args.repeats} rounds of {args.seconds:g} s per point")
    print("in-process ONNX Runtime img/s: " + ", ".join(
        f"batch {b}: {r:.1f}" for b, r in result["in_process"].items()))  # fmt: skip
    header = (
        f"{'server':<8}{'conc':>5}{'img/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'/ort b1':>8}{'/best':>7}"
    )
    print(header)
    wrong: dict[str, int] = {}
    for name in servers:
        result[name] = medians(rounds, name)
        for c, r in result[name].items():
            r["per_in_process_batch1"] = r["images_per_second"] / b1
            r["per_in_process_best"] = r["images_per_second"] / best
            print(
                f"{name:<8}{c:>5}{r['images_per_second']:>8.1f}{r['p50_ms']:>8.1f}"
                f"{r['p99_ms']:>8.1f}{r['per_in_process_batch1']:>8.2f}"
                f"{r['per_in_process_best']:>7.2f}"
            )
        wrong[name] = sum(m["mismatches"] for rd in rounds for m in rd[name].values())
    result["mismatches"] = wrong
    print("where a defcnn request's time goes (ms; medians over rounds of per-round means):")
    print(f"{'conc':>5}{'client p50':>12}{'in server':>11}{'queued':>9}{'in batch':>10}")
    splits = {}
    for c in args.concurrency:
        keys = ("client_p50_ms", "server_ms", "queued_ms", "batch_compute_ms")
        splits[c] = {k: statistics.median(rd["defcnn"][c]["split"][k] for rd in rounds)
                     for k in keys}  # fmt: skip
        sp = splits[c]
        print(f"{c:>5}{sp['client_p50_ms']:>12.2f}{sp['server_ms']:>11.2f}"
              f"{sp['queued_ms']:>9.2f}{sp['batch_compute_ms']:>10.2f}")  # fmt: skip
    result["defcnn_split"] = splits
    answers = sum(m["requests"] for rd in rounds for n in servers for m in rd[n].values())
    print(f"answers checked: {answers} (+3 warm-up per point), wrong: {wrong}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if any(wrong.values()):
        firsts = {
            n: next(m["first_mismatch"] for rd in rounds for m in rd[n].values() if m["mismatches"])
            for n, k in wrong.items()
            if k
        }
        raise SystemExit(f"WRONG ANSWERS: {wrong}; first of each: {firsts}")


if __name__ == "__main__":
    main()
