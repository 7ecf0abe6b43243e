"""A/B two source trees of `defcnn serve`, side by side: did a change cost throughput?

    git worktree add /tmp/base REV       # the baseline: any earlier commit
    python benchmarks/server_ab.py --baseline /tmp/base --concurrency 1 64 --repeats 5

Both servers serve the same model (serve_throughput.py's full-width defective ResNet-18)
from the same repository, one at a time, in alternating order each round, so drift on a
noisy machine hits both. Each measurement is a closed-loop run of C one-image clients
(`defcnn.client.loadtest`, every answer checked against in-process ONNX Runtime). Prints
the median answers/s per tree and the candidate/baseline ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _machine import machine
from serve_throughput import build_repo

from defcnn.client.loadtest import run_load
from defcnn.names import MODEL_FILE
from defcnn.server.launcher import local_server

HERE = Path(__file__).resolve().parent.parent


def pythonpath(tree: Path) -> str:
    """The tree's package roots first, so its `defcnn.server` shadows the installed one.

    The roots are the tree's own (every folder holding a `defcnn/` slice), so trees from
    before and after a layout change compare alike.
    """
    return os.pathsep.join(str(p.parent) for p in sorted(tree.glob("*/defcnn")) if p.is_dir())


def check_tree(tree: Path) -> None:
    """Fail unless a server started with this tree's path really imports this tree's code."""
    code = "import defcnn.server.app as m; print(m.__file__)"
    env = {**os.environ, "PYTHONPATH": pythonpath(tree)}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: the server would import {found}, not this tree")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="a checkout of the old code")
    p.add_argument("--candidate", type=Path, default=HERE, help="default: this checkout")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    trees = {"baseline": args.baseline, "candidate": args.candidate}
    for tree in trees.values():
        check_tree(tree)
    print(f"machine: {machine()}", flush=True)
    rates: dict[str, dict[int, list[float]]] = {k: {c: [] for c in args.concurrency} for k in trees}
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp))
        model = repo / "bench" / "1" / MODEL_FILE
        images = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": images})[0]
        for r in range(args.repeats):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                env = {"PYTHONPATH": pythonpath(trees[name])}
                with local_server(repo, Path(tmp) / f"{name}.log", env=env) as server:
                    for c in args.concurrency:
                        result = run_load(server.url, "bench", images, logits, clients=c,
                                          seconds=args.seconds)  # fmt: skip
                        s = result.summary()
                        failures += s.failures
                        rates[name][c].append(s.throughput_rps)
                        print(f"round {r + 1}/{args.repeats} {name:<9} c={c:<3} "
                              f"{s.throughput_rps:7.1f} answers/s  p50 "
                              f"{s.latency_ms.p50:.1f} ms", flush=True)  # fmt: skip
    rows = []
    print("\n| clients | baseline answers/s | candidate answers/s | candidate / baseline |")
    print("|---|---|---|---|")
    for c in args.concurrency:
        base, cand = (statistics.median(rates[k][c]) for k in ("baseline", "candidate"))
        rows.append({"clients": c, "baseline": base, "candidate": cand, "ratio": cand / base})
        print(f"| {c} | {base:.1f} | {cand:.1f} | {cand / base:.3f} |")
    print(f"wrong or failed answers: {failures}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rates": rates, "rows": rows}))
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
