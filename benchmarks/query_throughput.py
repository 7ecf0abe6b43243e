"""Query attacks' end-to-end throughput against `defcnn serve` vs that server's peak.

Same run, same server, same client: the peak is the client sending full max-batch requests
one after another for a fixed time (images/s). Each query attack (ART through our client,
`attack_images`: every image attacked at once, their candidates sent in shared requests of
at most the max batch) then attacks the same N correctly classified test images with a
fixed per-image budget; its rate is the images the server answered per second of attack
wall time. Each attack run follows its own peak measurement (the machine may be shared:
a ratio of neighbours holds better than one of distant medians); medians over repeats.
Beside the peak, the same client at batch N (N images): the most an attack that sends one
candidate per image per step (Square, SimBA, GeoDA's and Sign-OPT's searches) could reach.

The server serves a digits defective ResNet-18 (width 0.25, keep 0.1) trained here for a
few steps (or --checkpoint), exported as `defcnn export` does.

    python benchmarks/query_throughput.py --images 20 --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import machine

from defcnn.attack.blackbox import QUERY_ATTACKS, attack_images
from defcnn.client import InferenceClient
from defcnn.data import load_dataset
from defcnn.export.exporter import ExportSettings, export
from defcnn.server.launcher import local_server
from defcnn.training import TrainConfig, train
from defcnn.versions import versions

MODEL = "defective"


def _cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def build_repo(root: Path, checkpoint: str | None, max_batch: int) -> Path:
    if checkpoint is None:
        cfg = TrainConfig(arch="resnet18", width=0.25, defective=True, dataset="digits",
                          epochs=1, max_steps=150, schedule="fast", seed=0,
                          out=str(root / "run"))  # fmt: skip
        train(cfg, progress=False)
        checkpoint = str(root / "run" / "model.safetensors")
    repo = root / "repo"
    export(ExportSettings(checkpoint, str(repo), MODEL, max_batch_size=max_batch,
                          dataset="digits"))  # fmt: skip
    return repo


def peak(client: Any, x: np.ndarray, max_batch: int, seconds: float) -> float:
    batch = np.repeat(x[:1], max_batch, axis=0)
    client.logits(MODEL, batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.logits(MODEL, batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def run_attack(client: Any, name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
               budget: int, max_batch: int) -> dict[str, float]:  # fmt: skip
    sizes: list[int] = []
    eye = np.eye(num_classes, dtype=np.float32)
    decision = QUERY_ATTACKS[name].threat == "decision"

    def predict(b: np.ndarray) -> np.ndarray:
        sizes.append(len(b))
        if decision:
            return eye[client.predict(MODEL, b)]
        return client.probabilities(MODEL, b)

    before = client.counter(MODEL).images
    start = time.perf_counter()
    traces = attack_images(
        name, predict, x, y, num_classes, budget=budget, eps=16 / 255, seed=0,
        threat=QUERY_ATTACKS[name].threat, quantize=True, max_batch=max_batch,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    queries = client.counter(MODEL).images - before
    assert queries == sum(t.queries for t in traces), "the traces count every image sent"
    return {
        "queries": queries,
        "seconds": seconds,
        "images_per_second": queries / seconds,
        "mean_batch": float(np.mean(sizes)),
        "success_rate": float(np.mean([t.first_success is not None for t in traces])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", default=list(QUERY_ATTACKS), choices=QUERY_ATTACKS)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per peak measurement")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--checkpoint", help="a digits checkpoint (default: train one briefly)")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--server-cpus",
        type=_cpus,
        metavar="0,1",
        help="pin the server (and each of its threads) to these CPUs, with one "
        "ONNX Runtime thread per CPU: a server on cores of its own, as deployed",
    )
    p.add_argument("--client-cpus", type=_cpus, metavar="0,1", help="pin this process")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp), args.checkpoint, args.max_batch)
        threads = ("--threads", str(len(args.server_cpus))) if args.server_cpus else ()
        with local_server(repo, Path(tmp) / "serve.log", extra=threads) as server:
            if args.server_cpus:
                pin(server.pid, args.server_cpus)
            if args.client_cpus:
                pin(os.getpid(), args.client_cpus)
            client = InferenceClient(server.url)
            info = client.info(MODEL)
            data = load_dataset("digits", image_size=info.input_shape[1], progress=False)
            x_all = data.test_x[: 4 * args.images].astype(np.float32) / 255
            right = np.flatnonzero(client.predict(MODEL, x_all) == data.test_y[: len(x_all)])
            idx = right[: args.images]
            x, y = x_all[idx], data.test_y[idx]
            peaks: list[float] = []
            at_n: list[float] = []  # the server at batch N: one candidate per image a call
            runs: dict[str, list[dict[str, float]]] = {a: [] for a in args.attacks}
            for _ in range(args.repeats):
                at_n.append(peak(client, x, min(len(y), info.max_batch_size), args.seconds))
                for name in args.attacks:  # each attack beside its own peak measurement
                    peaks.append(peak(client, x, info.max_batch_size, args.seconds))
                    r = run_attack(client, name, x, y, info.num_classes, args.budget,
                                   info.max_batch_size)  # fmt: skip
                    runs[name].append({**r, "peak": peaks[-1],
                                       "ratio": r["images_per_second"] / peaks[-1]})  # fmt: skip
            client.close()

    top = statistics.median(peaks)
    result: dict[str, Any] = {
        "machine": machine(), "versions": versions("numpy", "onnxruntime", "grpcio", "art"),
        "images": len(y), "budget": args.budget, "max_batch_size": info.max_batch_size,
        "repeats": args.repeats, "peak_images_per_second": top, "peaks": peaks,
        "server_cpus": sorted(args.server_cpus or ()),
        "client_cpus": sorted(args.client_cpus or ()),
        "batch_n_images_per_second": statistics.median(at_n), "attacks": {},
    }  # fmt: skip
    print(f"machine: {result['machine']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"{len(y)} images, budget {args.budget}/image, eps 16/255, quantized to uint8; "
          f"medians of {args.repeats}")  # fmt: skip
    print(f"{'':<12}{'queries':>8}{'seconds':>9}{'images/s':>10}{'/ peak':>8}{'batch':>7}"
          f"{'success':>9}")  # fmt: skip
    print(f"{'peak':<12}{'':>8}{'':>9}{top:>10.1f}{1:>8.2f}{info.max_batch_size:>7}")
    n_rate, n = result["batch_n_images_per_second"], min(len(y), info.max_batch_size)
    print(f"{f'batch {n}':<12}{'':>8}{'':>9}{n_rate:>10.1f}{n_rate / top:>8.2f}{n:>7}")
    print("(an attack's / peak: the median of its ratios to the peak measured just before it)")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        result["attacks"][name] = {**med, "runs": rs}
        print(f"{QUERY_ATTACKS[name].title:<12}{med['queries']:>8.0f}{med['seconds']:>9.2f}"
              f"{med['images_per_second']:>10.1f}{med['ratio']:>8.2f}"
              f"{med['mean_batch']:>7.1f}{med['success_rate']:>9.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
