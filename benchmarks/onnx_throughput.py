"""Inference throughput: PyTorch eager vs ONNX Runtime, standard vs defective ResNet-18.

Both models are exported exactly as `defcnn export` does (BatchNorm folded, masks as
constant Muls). Each repeat times every (runtime, model, batch) cell in turn, so noise
hits all cells alike; the table reports medians over repeats, and the mask's cost as the
median over repeats of the defective/standard latency ratio in ONNX Runtime.

    python benchmarks/onnx_throughput.py --width 1.0 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _machine import machine
from tqdm import tqdm

from defcnn.export.onnx_graph import to_onnx
from defcnn.export.verify import ort_session
from defcnn.models import create_model


def seconds_per_batch(run: Callable[[], object], min_seconds: float) -> float:
    """Mean seconds per call over enough calls to fill `min_seconds` (after one warm call)."""
    run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.5, help="per cell per repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    torch.manual_seed(0)
    models = {
        "standard": create_model("resnet18", width=args.width).eval(),
        "defective": create_model("resnet18", width=args.width, defective=True).eval(),
    }
    sessions = {k: ort_session(to_onnx(m, 32).SerializeToString()) for k, m in models.items()}
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, 3, 32, 32), dtype=np.float32) for b in args.batches}

    def runner(runtime: str, kind: str, batch: int) -> Callable[[], object]:
        x = inputs[batch]
        if runtime == "onnxruntime":
            return lambda: sessions[kind].run(["logits"], {"input": x})
        tx = torch.from_numpy(x)

        def eager() -> object:
            with torch.inference_mode():
                return models[kind](tx)

        return eager

    cells = [(r, k, b) for b in args.batches for k in models for r in ("pytorch", "onnxruntime")]
    times: dict[tuple[str, str, int], list[float]] = {c: [] for c in cells}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for cell in cells:
            times[cell].append(seconds_per_batch(runner(*cell), args.min_seconds))

    rows = []
    for b in args.batches:
        for k in models:
            pt = statistics.median(b / t for t in times[("pytorch", k, b)])
            ox = statistics.median(b / t for t in times[("onnxruntime", k, b)])
            rows.append({"model": k, "batch": b, "pytorch_img_s": pt, "onnxruntime_img_s": ox})
    mask_cost = {
        b: statistics.median(
            d / s
            for s, d in zip(
                times[("onnxruntime", "standard", b)], times[("onnxruntime", "defective", b)],
                strict=True,
            )
        )
        for b in args.batches
    }  # fmt: skip
    result = {
        "machine": machine(torch.get_num_threads()), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "width": args.width, "repeats": args.repeats, "rows": rows,
        "onnxruntime_latency_ratio_defective_over_standard": mask_cost,
    }  # fmt: skip
    print(
        f"machine: {result['machine']} | torch {torch.__version__} | onnxruntime {ort.__version__}"
    )
    print(f"resnet18 width {args.width}, {args.repeats} repeats, medians (img/s)")
    print(f"{'model':<10}{'batch':>6}{'pytorch':>10}{'onnxrt':>10}{'ort/pt':>8}")
    for r in rows:
        ratio = r["onnxruntime_img_s"] / r["pytorch_img_s"]
        print(
            f"{r['model']:<10}{r['batch']:>6}{r['pytorch_img_s']:>10.1f}"
            f"{r['onnxruntime_img_s']:>10.1f}{ratio:>8.2f}"
        )
    for b, ratio in mask_cost.items():
        print(f"mask cost in ONNX Runtime, batch {b}: defective/standard latency {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
