"""What each attack on `defcnn serve` costs the server and its other callers.

One server (a small defective ResNet-18 with random weights: the attacks do not depend on
what it has learnt), started as an operator would: a bearer token, metrics on, and
--max-inflight-mb. For each attack: the server's RSS just before, its peak during (VmHWM,
reset first), and its RSS 2 s and 10 s after; meanwhile an honest caller with the token
sends ModelInfer for one image every 50 ms, and its p50 and worst latency (failed calls
included) and its failures are what the attack cost everyone else. The attacks are the
integration tests' (tests/integration/test_hostile.py), at sizes chosen to hurt:

1. unauthenticated burst: 32 concurrent 12 MiB ModelInfer calls without a token;
2. authenticated burst: the same with the token (read, parsed, then refused: FP16);
3. slow-to-parse request: 16 requests, 4 at a time, of 750,000 parameter entries each;
4. duplicate outputs: 200 small requests listing output `logits` 10,000 times;
5. health Watch flood: 1,000 Watch streams (open to all) held 3 s, then cancelled;
6. stalled bodies: 8 ModelInfer calls that send headers and never a message.

Linux only (/proc). About 2 to 3 minutes.

    python benchmarks/server_attacks.py --json /tmp/server_attacks.json
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _machine import machine
from grpc_health.v1 import health_pb2, health_pb2_grpc

from defcnn.checkpoint import save_checkpoint
from defcnn.export.exporter import ExportSettings, export
from defcnn.models import ModelSpec, create_model
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.protos import grpc_service_pb2_grpc as pb_grpc
from defcnn.server.launcher import local_server

MODEL = "digits"
MAX_BATCH = 1024  # requests up to 12 MiB: large bodies are read, not refused by length
INFER = "/inference.GRPCInferenceService/ModelInfer"
RAW_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]
PROBE_PERIOD_S = 0.05
AFTER_S = (2.0, 10.0)  # RSS is reported this long after each attack ends


@dataclass(frozen=True)
class Target:
    """What an attack needs to know about the server."""

    address: str
    token: str

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


Codes = Counter[str]
Run = Callable[[], Codes]
Attack = Callable[[Target], Run]  # prepares (payloads built, off the clock), returns the run


def build_repo(root: Path) -> Path:
    """A model repository holding one small model, exported as `defcnn export` does: small,
    so that what is measured is the attack's cost, not the model's."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet18", width=0.125, defective=True, keep_prob=0.3)
    ckpt = root / "attacks.safetensors"
    save_checkpoint(ckpt, create_model(spec), spec, {"classes": [str(i) for i in range(10)]})
    repo = root / "repo"
    export(ExportSettings(str(ckpt), str(repo), MODEL, max_batch_size=MAX_BATCH, dataset="digits"))
    return repo


def infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    """A valid-looking ModelInfer request for float32 images, as raw contents."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


# --- the server's memory, from /proc ---------------------------------------------------------


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS now, peak RSS since the last reset) of a process, in MiB."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux 4.0+), so the next peak read is this attack's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- the honest caller ------------------------------------------------------------------------


class Probe:
    """One caller with the token, sending ModelInfer for one image every 50 ms (the next as
    soon as an answer comes, when one takes longer) on its own channel: what the attack
    costs everyone else. Latencies of failed calls are kept too: a call held 10 s and then
    refused cost its caller 10 s."""

    def __init__(self, target: Target) -> None:
        self.channel = grpc.insecure_channel(target.address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = target.metadata
        x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
        self.request = infer_request(x)
        for _ in range(5):  # connected and warm before anything is measured
            self.stub.ModelInfer(self.request, timeout=30, metadata=self.metadata)
        self.latencies: list[float] = []
        self.failures: Codes = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.latencies, self.failures = [], Counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop (after the call in flight) and summarise the calls since `start`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lat = sorted(self.latencies)
        return {
            "calls": len(lat),
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "max_ms": 1000 * lat[-1] if lat else None,
            "failures": dict(self.failures),
        }

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.stub.ModelInfer(self.request, timeout=30, metadata=self.metadata)
            except grpc.RpcError as exc:
                self.failures[exc.code().name] += 1
            self.latencies.append(time.monotonic() - start)
            due = max(due + PROBE_PERIOD_S, time.monotonic())
            self._stop.wait(due - time.monotonic())

    def close(self) -> None:
        self.channel.close()


# --- the attacks -------------------------------------------------------------------------------


def raw_infer(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """ModelInfer taking and returning bytes: attackers send what they like."""
    return channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)


def concurrently(threads: int, calls: int, one: Callable[[], str]) -> Codes:
    """`calls` calls of `one` (which returns a status code's name) from `threads` threads."""
    codes: Codes = Counter()
    lock = threading.Lock()
    left = iter(range(calls))

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            code = one()
            with lock:
                codes[code] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return codes


def code_of(call: Callable[[], object]) -> str:
    """The status code `call` ends with, by name."""
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def burst(target: Target, payload: bytes, calls: int, token: bool) -> Codes:
    """`calls` concurrent calls of `payload`, each on its own channel (own connection), as
    many clients would: the server reads up to its budget of them at once."""
    metadata = target.metadata if token else None

    def one() -> str:
        with grpc.insecure_channel(target.address, options=RAW_OPTIONS) as channel:
            return code_of(lambda: raw_infer(channel)(payload, timeout=120, metadata=metadata))

    return concurrently(calls, calls, one)


def big_request() -> bytes:
    """12 MiB: a full batch of 1,000 images, valid in every way but the datatype, so that
    it is received and parsed before it is refused."""
    request = infer_request(np.zeros((1000, 3, 32, 32), np.float32))
    request.inputs[0].datatype = "FP16"
    return request.SerializeToString()


def unauthenticated_burst(target: Target) -> Run:
    """Anyone who can reach the port: refused before the bodies are read?"""
    payload = big_request()
    return lambda: burst(target, payload, 32, token=False)


def authenticated_burst(target: Target) -> Run:
    """A caller with the token: each body is read (within --max-inflight-mb), then refused."""
    payload = big_request()
    return lambda: burst(target, payload, 32, token=True)


def _entry(field: int, body: bytes) -> bytes:
    """One length-delimited protobuf field (bodies here are under 128 bytes)."""
    return bytes([field << 3 | 2, len(body)]) + body


def slow_to_parse_parameters() -> bytes:
    """About 11.5 MiB of 750,000 distinct request parameters (a protobuf map): a quarter of
    a second or more of parsing while holding the GIL, unless refused before parsing."""
    head = pb.ModelInferRequest(model_name=MODEL).SerializeToString()
    value = _entry(2, b"\x10\x01")  # InferParameter{int64_param: 1}
    params = (_entry(1, b"%08d" % i) + value for i in range(750_000))
    return head + b"".join(_entry(4, e) for e in params)


def repeated(target: Target, payload: bytes, threads: int, calls: int, timeout: float) -> Run:
    """`calls` ModelInfer calls of `payload` with the token, `threads` at a time, on one
    connection."""

    def run() -> Codes:
        with grpc.insecure_channel(target.address, options=RAW_OPTIONS) as channel:
            call = raw_infer(channel)
            return concurrently(threads, calls, lambda: code_of(
                lambda: call(payload, timeout=timeout, metadata=target.metadata)))  # fmt: skip

    return run


def slow_to_parse(target: Target) -> Run:
    """Four at a time, 16 in all, with the token: a parse each would stall every caller."""
    return repeated(target, slow_to_parse_parameters(), 4, 16, timeout=120)


def duplicate_outputs(target: Target) -> Run:
    """200 small requests (one image) asking for `logits`, top-10 classes, 10,000 times:
    work multiplied by the answer's size unless refused when counted."""
    request = infer_request(np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32))
    for _ in range(10_000):
        request.outputs.add(name="logits").parameters["classification"].int64_param = 10
    return repeated(target, request.SerializeToString(), 4, 200, timeout=60)


def health_watch_flood(target: Target) -> Run:
    return lambda: _health_watch_flood(target)


def _health_watch_flood(target: Target) -> Codes:
    """1,000 Watch streams (the health service needs no token) over 4 connections, held 3 s
    and cancelled: an open stream is OK, a refused one its code."""
    channels = [grpc.insecure_channel(target.address) for _ in range(4)]
    request = health_pb2.HealthCheckRequest(service="")
    codes: Codes = Counter()
    try:
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        watches = [stubs[i % len(stubs)].Watch(request, timeout=60) for i in range(1000)]
        for w in watches:
            try:
                next(w)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        time.sleep(3)
        for w in watches:
            w.cancel()
    finally:
        for c in channels:
            c.close()
    return codes


def stalled_bodies(target: Target) -> Run:
    return lambda: _stalled_bodies(target)


def _stalled_bodies(target: Target) -> Codes:
    """8 ModelInfer calls that open the stream, send headers (and the token) and no
    message, watched for 12 s: each holds a reservation until the server's 10 s read limit
    cuts it off; one still open at 12 s counts as STILL_OPEN."""
    release = threading.Event()

    def body() -> Iterator[bytes]:
        release.wait(60)
        yield b""

    channel = grpc.insecure_channel(target.address, options=RAW_OPTIONS)
    stalled = channel.stream_unary(INFER, request_serializer=None, response_deserializer=None)
    try:
        futures = [stalled.future(body(), timeout=60, metadata=target.metadata) for _ in range(8)]
        time.sleep(12)
        codes: Codes = Counter()
        for f in futures:
            if not f.done():
                codes["STILL_OPEN"] += 1
                f.cancel()
                continue
            codes[code_of(f.result)] += 1
        return codes
    finally:
        release.set()
        channel.close()


def no_attack(target: Target) -> Run:
    """5 s of the probe alone: what its latencies are when nobody attacks."""

    def run() -> Codes:
        time.sleep(5)
        return Counter()

    return run


ATTACKS: list[tuple[str, Attack]] = [
    ("none (probe alone, 5 s)", no_attack),
    ("unauthenticated burst", unauthenticated_burst),
    ("authenticated burst", authenticated_burst),
    ("slow-to-parse request", slow_to_parse),
    ("duplicate outputs", duplicate_outputs),
    ("health Watch flood", health_watch_flood),
    ("stalled bodies", stalled_bodies),
]


def measure(name: str, attack: Attack, target: Target, pid: int, probe: Probe) -> dict[str, Any]:
    """One attack, with the server's memory around it and the probe running through it."""
    run = attack(target)  # payloads built before the clock and the probe start
    before, _ = memory_mib(pid)
    reset_peak(pid)
    probe.start()
    start = time.monotonic()
    codes = run()
    end = time.monotonic()
    probed = probe.stop()
    _, peak = memory_mib(pid)
    series: list[tuple[float, float]] = []  # (s after the end, RSS MiB), every 0.5 s
    while (t := time.monotonic() - end) < AFTER_S[-1]:
        series.append((round(t, 2), memory_mib(pid)[0]))
        time.sleep(0.5)
    series.append((round(time.monotonic() - end, 2), memory_mib(pid)[0]))
    after = {f"rss_after_{s:g}s_mib": next(r for t, r in series if t >= s) for s in AFTER_S}
    return {
        "attack": name,
        "seconds": end - start,
        "codes": dict(codes),
        "rss_before_mib": before,
        "rss_peak_mib": peak,
        **after,
        "rss_after_series": series,
        "probe": probed,
    }


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1])) or "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'attack':<25}{'s':>5}{'RSS MiB: before':>16}{'peak':>7}{'+2 s':>7}{'+10 s':>7}"
        f"{'probe n':>9}{'p50 ms':>8}{'max ms':>9}  {'probe failures':<18}attack codes"
    )
    for r in rows:
        p = r["probe"]
        print(
            f"{r['attack']:<25}{r['seconds']:>5.1f}{r['rss_before_mib']:>16.0f}"
            f"{r['rss_peak_mib']:>7.0f}{r['rss_after_2s_mib']:>7.0f}{r['rss_after_10s_mib']:>7.0f}"
            f"{p['calls']:>9}{_ms(p['p50_ms']):>8}{_ms(p['max_ms']):>9}  "
            f"{_codes(p['failures']):<18}{_codes(r['codes'])}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--max-inflight-mb", type=int, default=256, help="passed to defcnn serve")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        p.error("needs Linux /proc (VmRSS, VmHWM and clear_refs)")

    command = shlex.join(["python", *sys.argv])
    result: dict[str, Any] = {"machine": machine(), "command": command,
                              "grpcio": grpc.__version__,
                              "max_inflight_mb": args.max_inflight_mb}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = build_repo(root)
        token = secrets.token_urlsafe(24)
        token_file = root / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        extra = ["--auth-token-file", str(token_file), "--max-inflight-mb",
                 str(args.max_inflight_mb)]  # fmt: skip
        with local_server(repo, root / "defcnn-serve.log", metrics=True, extra=extra) as srv:
            target = Target(srv.url, token)
            probe = Probe(target)
            rows = []
            try:
                for name, attack in ATTACKS:
                    print(f"... {name}", file=sys.stderr, flush=True)
                    rows.append(measure(name, attack, target, srv.pid, probe))
            finally:
                probe.close()
            alive = srv.process.poll() is None
            tail = srv.log.read_text(errors="replace")
    result["server_alive_at_end"] = alive
    result["tracebacks_in_log"] = tail.count("Traceback")
    result["attacks"] = rows

    print(f"machine: {result['machine']} | grpcio {grpc.__version__}")
    print(f"command: {command}")
    print(
        f"server: resnet18 width 0.125 defective keep 0.3, max batch {MAX_BATCH}, "
        f"--max-inflight-mb {args.max_inflight_mb}, token required; probe: 1 image every "
        f"{1000 * PROBE_PERIOD_S:.0f} ms (latencies of failed calls included)"
    )
    print_table(rows)
    print(f"server alive at the end: {alive}; tracebacks in its log: {result['tracebacks_in_log']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
