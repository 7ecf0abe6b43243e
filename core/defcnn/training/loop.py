"""The training loop: the data set as tensors on the device, augmented there, resumable.

Every random choice is a function of (seed, epoch, batch): the order of an epoch and
the augmentation of each batch come from generators seeded by name, so a run resumed
from any saved step continues exactly as the uninterrupted run would have. Under
torchrun every rank builds the same global batch and trains on its own slice of it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from defcnn.atomic import write_json
from defcnn.checkpoint import load_checkpoint, save_checkpoint
from defcnn.data import augment_batch, load_dataset
from defcnn.errors import ConfigError
from defcnn.layers.defective import derive_seed
from defcnn.models.registry import create_model
from defcnn.training import distributed
from defcnn.training.config import NEAR_TARGET, TrainConfig, lr_at
from defcnn.versions import versions

LAST = "checkpoint-last.safetensors"
FINAL = "model.safetensors"
POSTFIX_EVERY = 25  # steps between the progress bar's loss and accuracy figures
# Settings that may change between a run and its resumption without changing the result.
_RESUMABLE_FIELDS = ("out", "device", "checkpoint_seconds", "max_steps", "download", "data_dir")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set for one epoch."""
    gen = torch.Generator().manual_seed(derive_seed(seed, f"order/{epoch}"))
    return torch.randperm(n, generator=gen)


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator that drives the augmentation of one batch."""
    return torch.Generator().manual_seed(derive_seed(seed, f"augment/{epoch}/{index}"))


def global_batch(
    images: torch.Tensor, order: torch.Tensor, epoch: int, index: int, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` of `epoch`: row indices and augmented float images in [0, 1]."""
    rows = order[index * cfg.batch_size : (index + 1) * cfg.batch_size]
    x = images[rows.to(images.device)].float().div_(255)
    gen = batch_generator(cfg.seed, epoch, index)
    return rows, augment_batch(x, generator=gen, pad=cfg.crop_pad, flip=cfg.flip)


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    return math.ceil(n / cfg.batch_size)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy (and the count right, for intervals) and mean cross-entropy of `model` on
    uint8 images [N, 3, H, W]."""
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).float().div_(255)
            y = labels[start : start + batch_size].to(device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    n = max(1, len(images))
    return {"accuracy": correct / n, "loss": loss_sum / n, "count": len(images), "correct": correct}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"optim/{idx}/{name}": value
        for idx, state in opt.state_dict()["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, idx, name = key.split("/", 2)
        if kind == "optim":
            state.setdefault(int(idx), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for key in _RESUMABLE_FIELDS:
        d.pop(key, None)
    return json.loads(json.dumps(d))


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train per `cfg`, writing checkpoints, config and metrics into ``cfg.out``.

    With `resume`, continue from the last checkpoint in ``cfg.out``; without it, refuse
    to overwrite a folder that already holds a run.
    """
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, resume=resume, progress=progress)
    finally:
        distributed.teardown(ctx)


def _train(
    cfg: TrainConfig, ctx: distributed.DistContext, *, resume: bool, progress: bool
) -> dict[str, Any]:
    out = Path(cfg.out)
    last = out / LAST
    if not resume and ((out / FINAL).exists() or last.exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume or choose another --out")
    if cfg.batch_size < ctx.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} < world size {ctx.world_size}")
    if cfg.stop_at_accuracy is not None and ctx.enabled:
        raise ConfigError("stop_at_accuracy runs on one process only (not with torchrun)")

    data = load_dataset(
        cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download,
        progress=progress and ctx.is_main,
    )  # fmt: skip
    spec = cfg.model_spec(len(data.classes), data.image_size[0])
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = create_model(spec).to(ctx.device)
    cuda = ctx.device.type == "cuda"
    if cuda:
        # Module.to takes memory_format at run time; torch's stubs leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = _optimizer(model, cfg)

    step = 0
    history: list[dict[str, Any]] = []
    stopped_at: int | None = None  # the step whose check reached stop_at_accuracy
    checks: list[dict[str, Any]] = []  # every stop_at_accuracy check: step, test accuracy
    check_every = cfg.eval_every
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        saved = TrainConfig.from_dict(ckpt.meta["train_config"])
        if _comparable(saved) != _comparable(cfg):
            raise ConfigError(f"{last} was written by a different configuration; cannot resume")
        model.load_state_dict(ckpt.state_dict)
        _restore_optimizer(opt, ckpt.train_state)
        step = int(ckpt.meta["step"])
        history = list(ckpt.meta.get("history", []))
        stopped_at = ckpt.meta.get("stopped_at")
        checks = list(ckpt.meta.get("checks", []))
        check_every = ckpt.meta.get("check_every", check_every)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())

    net: nn.Module = model
    if ctx.enabled:
        if cuda:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DistributedDataParallel(net, device_ids=[ctx.device] if cuda else None)

    train_x = torch.from_numpy(data.train_x).to(ctx.device)
    train_y = torch.from_numpy(data.train_y).to(ctx.device)
    per_epoch = steps_per_epoch(len(train_x), cfg)
    total = min(cfg.max_steps or math.inf, cfg.epochs * per_epoch)
    base_every = cfg.eval_every or max(1, per_epoch // 4)  # far from the target
    check_every = check_every or base_every
    if stopped_at is not None:  # resuming a run that stopped: it ends where it stopped
        total = stopped_at
    if resume and step >= total and (out / FINAL).exists() and (out / "metrics.json").exists():
        # a finished run of this configuration: nothing to train, and its files stay as they
        # are (its train time too), so a script can resume every run it needs, every time
        finished = json.loads((out / "metrics.json").read_text())
        finished.pop("history", None)
        return dict(finished)
    checked: tuple[int, dict[str, float]] | None = None  # (step, scores) of the last check

    def reached(scores: dict[str, float]) -> bool:
        """Record a check; true when it ends the run (past the target, or within the band)."""
        nonlocal check_every
        target = cfg.stop_at_accuracy
        if target is None:
            return False
        accuracy = scores["accuracy"]
        checks.append({"step": step, "test_accuracy": accuracy})
        if cfg.stop_within is not None and accuracy >= target - NEAR_TARGET:
            check_every = max(1, base_every // 8)
        if cfg.stop_within is None:
            return accuracy >= target
        return abs(accuracy - target) <= cfg.stop_within

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()

    def save_last() -> None:
        if ctx.is_main:
            meta = {
                "train_config": cfg.to_dict(), "step": step, "history": history,
                "stopped_at": stopped_at, "checks": checks, "check_every": check_every,
                "classes": list(data.classes), "versions": versions("torch", "numpy"),
            }  # fmt: skip
            save_checkpoint(last, model, spec, meta, _optimizer_tensors(opt))
        ctx.barrier()

    started = time.perf_counter()
    last_save = started
    images_seen = 0
    model.train()
    while step < total:
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(len(train_x), cfg.seed, epoch)
        bar = tqdm(
            total=per_epoch, initial=index, desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (progress and ctx.is_main), leave=True, unit="batch",
        )  # fmt: skip
        # Summed on the device: reading a value waits for the GPU to finish every queued step,
        # so it is read every POSTFIX_EVERY steps and at the epoch's end, not at every step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        seen, t0 = 0, time.perf_counter()
        while index < per_epoch and step < total:
            rows, x = global_batch(train_x, order, epoch, index, cfg)
            y = train_y[rows.to(ctx.device)]
            x = x.tensor_split(ctx.world_size)[ctx.rank]
            y = y.tensor_split(ctx.world_size)[ctx.rank]
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, per_epoch)
            with autocast:
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            index += 1
            n = len(y) * ctx.world_size
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            images_seen += n
            bar.update(1)
            if index % POSTFIX_EVERY == 0 or index == per_epoch:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen * ctx.world_size / (time.perf_counter() - t0):.0f}",
                    lr=f"{opt.param_groups[0]['lr']:.3g}",
                )  # fmt: skip
            if cfg.stop_at_accuracy is not None and step % check_every == 0 and index < per_epoch:
                checked = (step, evaluate(model, data.test_x, data.test_y, device=ctx.device))
                if reached(checked[1]):
                    stopped_at = total = step
            if time.perf_counter() - last_save > cfg.checkpoint_seconds and index < per_epoch:
                save_last()
                last_save = time.perf_counter()
        bar.close()
        if index == per_epoch or step == total:
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step,
                "train_loss": loss_sum.item() / max(1, seen),
                "train_accuracy": correct.item() / max(1, seen),
                "images_per_second": seen * ctx.world_size / max(1e-9, time.perf_counter() - t0),
            }  # fmt: skip
            if ctx.is_main:
                if checked is not None and checked[0] == step:
                    scores = checked[1]  # this step's check, already recorded
                else:
                    scores = evaluate(model, data.test_x, data.test_y, device=ctx.device)
                    if stopped_at is None and reached(scores):
                        stopped_at = total = step
                record.update({f"test_{k}": v for k, v in scores.items()})
                if progress:
                    tqdm.write(
                        f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc "
                        f"{record['train_accuracy']:.4f} | test acc {record['test_accuracy']:.4f}"
                    )
            history.append(record)
            save_last()
            last_save = time.perf_counter()

    elapsed = time.perf_counter() - started
    final = history[-1] if history else {}
    metrics = {
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "train_loss": final.get("train_loss"),
        "epochs_completed": len(history),
        "steps": step,
        "seconds_this_session": elapsed,
        "images_per_second_this_session": images_seen / max(1e-9, elapsed),
        "device": str(ctx.device),
        "world_size": ctx.world_size,
    }
    if cfg.stop_at_accuracy is not None:
        metrics["stopped_at_step"] = stopped_at  # None: no check reached the target
        metrics["stopped_at_epoch"] = None if stopped_at is None else stopped_at / per_epoch
        metrics["checks"] = checks
    if ctx.is_main:
        meta = {
            "train_config": cfg.to_dict(), "classes": list(data.classes), "metrics": metrics,
            "history": history, "dataset": {"name": data.name, "source": data.source},
            "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
            "versions": versions("torch", "numpy"), "step": step,
        }  # fmt: skip
        save_checkpoint(out / FINAL, model, spec, meta)
        write_json(out / "metrics.json", {**metrics, "history": history})
    ctx.barrier()
    return metrics
