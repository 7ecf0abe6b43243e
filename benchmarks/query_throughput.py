"""Query attacks' end-to-end queries/s against a running server vs that server's peak.

Peak: the same client sending full max-batch requests for a fixed time (images/s). Then
each query attack (ART through our client, one image at a time as the harness runs it)
attacks the same images with a fixed budget; queries/s = images the server answered per
second of attack wall time. Same run, same server, same client.

    defcnn serve --model-repo REPO --port 18500 --metrics-port -1 &
    python benchmarks/query_throughput.py --url 127.0.0.1:18500 --model defective
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from defcnn.attack.blackbox import attack_one
from defcnn.client import InferenceClient
from defcnn.data import load_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--attacks", nargs="+", default=["square", "hopskipjump", "boundary", "simba"])
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--seconds", type=float, default=5.0, help="peak measurement time")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    client = InferenceClient(args.url)
    info = client.info(args.model)
    data = load_dataset("digits", progress=False)
    x = data.test_x[: args.images].astype(np.float32) / 255
    y = data.test_y[: args.images]
    batch = np.repeat(x[:1], info.max_batch_size, axis=0)
    client.logits(args.model, batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        client.logits(args.model, batch)
        n += len(batch)
    peak = n / (time.perf_counter() - start)
    result: dict[str, Any] = {
        "peak_images_per_second": peak,
        "max_batch_size": info.max_batch_size,
        "attacks": {},
    }
    print(f"server peak (batch {info.max_batch_size}): {peak:.1f} images/s")
    for name in args.attacks:
        before = client.counter(args.model).images
        start = time.perf_counter()
        for i in range(len(y)):
            attack_one(
                name, lambda b: client.probabilities(args.model, b), x[i], int(y[i]),
                info.num_classes, budget=args.budget, eps=16 / 255, seed=i,
            )  # fmt: skip
        elapsed = time.perf_counter() - start
        queries = client.counter(args.model).images - before
        rate = queries / elapsed
        result["attacks"][name] = {
            "queries": queries,
            "seconds": elapsed,
            "queries_per_second": rate,
        }
        print(f"{name:<12} {queries:>6} queries in {elapsed:6.1f} s: {rate:7.1f} q/s "
              f"({rate / peak:.2f}x peak)")  # fmt: skip
    client.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
