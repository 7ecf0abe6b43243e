"""Training throughput of standard vs defective ResNet-18, measured side by side.

Each repeat times the same number of SGD steps (forward, backward, update) for every
variant in turn, on the same synthetic batch, so machine noise hits both alike; the
table reports medians over repeats and the median of the per-repeat ratios.

    python benchmarks/train_throughput.py --width 0.25 --repeats 7
    python benchmarks/train_throughput.py --device cuda --width 1.0 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine
from tqdm import tqdm

from defcnn.models import create_model
from defcnn.training.distributed import pick_device
from defcnn.versions import versions


def time_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, amp: bool
) -> float:
    """Seconds for `steps` optimiser steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    cuda = x.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else nullcontext()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps timed per variant per repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--keep-prob", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = pick_device(args.device)
    torch.manual_seed(0)
    variants = {
        "standard": create_model("resnet18", width=args.width),
        f"defective p={args.keep_prob}": create_model(
            "resnet18", width=args.width, defective=True, keep_prob=args.keep_prob
        ),
    }
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    for model in variants.values():
        model.to(device).train()
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in stubs
        time_steps(model, x, y, 2, not args.no_amp)  # warm-up
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, model in variants.items():
            seconds = time_steps(model, x, y, args.steps, not args.no_amp)
            rates[name].append(args.steps * args.batch_size / seconds)
    names = list(variants)
    ratios = [d / s for s, d in zip(rates[names[0]], rates[names[1]], strict=True)]
    result = {
        "machine": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else machine(torch.get_num_threads())
        ),
        "device": str(device),
        "versions": versions("torch"),
        "arch": "resnet18",
        "width": args.width,
        "batch_size": args.batch_size,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "amp_bf16": device.type == "cuda" and not args.no_amp,
        "median_images_per_second": {n: statistics.median(r) for n, r in rates.items()},
        "median_ratio_defective_over_standard": statistics.median(ratios),
    }
    print(f"machine: {result['machine']} | torch {result['torch']} | device {device}")
    print(f"resnet18 width {args.width}, batch {args.batch_size}, {args.repeats} repeats")
    print(f"{'variant':<22}{'median img/s':>14}")
    for name, value in result["median_images_per_second"].items():
        print(f"{name:<22}{value:>14.1f}")
    print(f"median ratio defective/standard: {result['median_ratio_defective_over_standard']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
