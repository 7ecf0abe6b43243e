"""Soak: 64 concurrent clients against a local `defcnn serve` for a bounded time, every
answer checked against in-process ONNX Runtime, the server's memory and queue watched.

    python benchmarks/soak.py --seconds 300 --out runs/soak --plot docs/img/soak.png

Without --model-repo it exports the benchmark model of serve_throughput.py (a full-width
CIFAR ResNet-18, defective keep 0.1, random weights: correctness and memory do not depend
on them). Exit code 0 only if every check passed. The same run is `defcnn bench soak` on an
existing repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _machine import machine
from serve_throughput import build_repo

from defcnn.bench.soak import SoakSettings, run_soak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repo", help="default: export the benchmark model to a temp folder")
    p.add_argument("--model", default="bench")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--max-queue-size", type=int, default=256)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--plot", help="also copy the figure here (e.g. docs/img/soak.png)")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repo or str(build_repo(Path(tmp)))
        result = run_soak(SoakSettings(
            model_repo=repo, model=args.model, clients=args.clients, seconds=args.seconds,
            warmup_seconds=args.warmup, max_queue_size=args.max_queue_size, out=args.out,
        ))  # fmt: skip
    saved = result.to_dict()
    summary = {k: saved[k] for k in ("soak", "warmup", "rss_mb", "queue", "checks", "passed")}
    print(json.dumps({"machine": machine(), **summary}, indent=2))
    if args.plot:
        shutil.copyfile(Path(args.out) / "soak.png", args.plot)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
