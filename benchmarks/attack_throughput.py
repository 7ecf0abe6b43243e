"""PGD-20 throughput: this project's attack vs ART's, against 20 bare forward+backward passes.

Each repeat times, in turn on the same surrogate and the same batch, our ``PGD``, ART's
``ProjectedGradientDescent`` (``num_random_init=0``) and 20 forward+backward passes (the
floor any 20-step gradient attack pays), so machine noise hits all alike; the table
reports medians over repeats. The surrogate is a randomly initialised ResNet-18: weights
do not change the cost.

    python benchmarks/attack_throughput.py --width 0.25 --batch-size 128 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import art
import torch
import torch.nn.functional as F
from _machine import machine
from torch import nn

from defcnn.attack import PGD
from defcnn.models import create_model

EPS, STEP, STEPS = 16 / 255, 1 / 255, 20


def fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weights: bool) -> None:
    """20 forward+backward passes: input gradient only, or input and weight gradients."""
    for _ in range(STEPS):
        xg = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        if weights:
            model.zero_grad(set_to_none=True)
            loss.backward()
        else:
            torch.autograd.grad(loss, xg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("art").setLevel(logging.WARNING)

    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(0)
    model = create_model("resnet18", width=args.width, num_classes=10).eval()
    size = args.image_size
    x = torch.rand(args.batch_size, 3, size, size)
    y = torch.randint(0, 10, (args.batch_size,))
    ours = PGD(eps=EPS, step=STEP, steps=STEPS)
    clf = PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=(3, size, size), nb_classes=10,
        clip_values=(0.0, 1.0),
    )  # fmt: skip
    theirs = ProjectedGradientDescent(
        clf, eps=EPS, eps_step=STEP, max_iter=STEPS, num_random_init=0,
        batch_size=args.batch_size, verbose=False,
    )  # fmt: skip
    x_np, y_np = x.numpy(), y.numpy()
    runs: dict[str, Callable[[], object]] = {
        "ours PGD-20": lambda: ours(model, x, y),
        "ART PGD-20": lambda: theirs.generate(x_np, y_np),
        "20 fwd+bwd (input grad)": lambda: fwd_bwd(model, x, y, weights=False),
        "20 fwd+bwd (+weight grads)": lambda: fwd_bwd(model, x, y, weights=True),
    }
    for run in runs.values():  # warm-up: allocator, oneDNN kernel selection
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"machine: {machine(torch.get_num_threads())}")
    print(f"torch {torch.__version__}, ART {art.__version__}, resnet18 width {args.width}, "
          f"batch {args.batch_size}, {size}x{size}, {args.repeats} repeats (medians)")  # fmt: skip
    print(f"{'run':<28} {'s/batch':>9} {'images/s':>10}")
    for name, sec in med.items():
        print(f"{name:<28} {sec:>9.3f} {args.batch_size / sec:>10.1f}")
    ref = med["20 fwd+bwd (input grad)"]
    print(
        f"throughput ours/ART: {med['ART PGD-20'] / med['ours PGD-20']:.2f}x; "
        f"ours costs {med['ours PGD-20'] / ref:.2f}x the 20 fwd+bwd (input grad) floor"
    )


if __name__ == "__main__":
    main()
