"""White-box success at 16/255 on a small undefended CIFAR-10 CNN, with intervals.

The paper's undefended CIFAR-10 models fall to every gradient attack at 16/255. This
measures that on a model small enough for a CPU: a two-layer CNN trained for four epochs
on 12,000 images of CIFAR-10 (JPEG q75 copy), attacked on the test images it classifies
correctly, each adversarial image rounded to uint8 inside the eps-ball as an endpoint
would receive it. Success rates carry 95% Wilson intervals. It was a test with a 99% bar
once; the rate moves with the CPU's float kernels and the thread count (0.989 on one
AVX-512 machine), so it is a measurement, not a pass/fail check. Seeds fixed (0).

    python benchmarks/white_box_cifar.py --data ../shared/data/cifar10-jpeg.tar.gz --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine
from torch import nn

from defcnn.attack import make_attack, quantize
from defcnn.data import load_dataset
from defcnn.layers import Normalize
from defcnn.layers.normalize import CIFAR10_MEAN, CIFAR10_STD
from defcnn.stats import wilson
from defcnn.versions import versions

ATTACKS = ("fgsm", "pgd", "mifgsm", "difgsm")


def train_small_cnn(data, train_images: int, epochs: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train_y), generator=gen)[:train_images].numpy()
    x = torch.from_numpy(data.train_x[idx]).float() / 255
    y = torch.from_numpy(data.train_y[idx])
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize(CIFAR10_MEAN, CIFAR10_STD),
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            rows = order[i : i + 64]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tree or tarball")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eps", type=float, default=16.0, help="L-inf budget in 1/255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stack = versions("torch", "numpy", "pillow")
    print(f"machine: {machine(args.threads)}; " + ", ".join(f"{k} {v}" for k, v in stack.items()))
    with tempfile.TemporaryDirectory() as cache:
        data = load_dataset("imagefolder", args.data, cache_dir=cache, progress=False)
    start = time.perf_counter()
    model = train_small_cnn(data, args.train_images, args.epochs, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    test_idx = torch.randperm(len(data.test_y), generator=gen)[: args.test_images].numpy()
    xt = torch.from_numpy(data.test_x[test_idx]).float() / 255
    yt = torch.from_numpy(data.test_y[test_idx])
    with torch.no_grad():
        right = model(xt).argmax(1) == yt
    clean = wilson(int(right.sum()), len(yt))
    xs, ys = xt[right], yt[right]
    eps = args.eps / 255
    rows = []
    for name in ATTACKS:
        adv = quantize(make_attack(name, eps)(model, xs, ys), xs, eps)
        with torch.no_grad():
            fooled = int((model(adv).argmax(1) != ys).sum())
        rows.append({"attack": name, "rate": wilson(fooled, len(ys))})
    print(f"\nclean accuracy {clean} on {len(yt)} test images "
          f"({time.perf_counter() - start:.0f} s to train and attack)")  # fmt: skip
    print(f"\n| attack (paper preset) | eps | success on {len(ys)} correct images [95% CI] |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {args.eps:g}/255 | {row['rate']} |")
    if args.out:
        doc = {
            "machine": machine(args.threads), "versions": stack, "seed": args.seed,
            "settings": vars(args), "clean": clean.__dict__,
            "rows": [{"attack": r["attack"], **r["rate"].__dict__} for r in rows],
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
