"""Training: loss falls, masks stay fixed, runs resume exactly, DDP matches one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from defcnn.checkpoint import load_checkpoint, load_model
from defcnn.data import load_dataset
from defcnn.errors import ConfigError
from defcnn.layers import mask_buffers
from defcnn.layers.defective import derive_seed
from defcnn.models import create_model
from defcnn.training import TrainConfig, lr_at, train
from defcnn.training.config import NEAR_TARGET
from defcnn.training.loop import FINAL, LAST, epoch_order, global_batch, steps_per_epoch

TINY: dict[str, Any] = {"arch": "resnet18", "width": 0.125, "defective": True, "keep_prob": 0.5}


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(
        **{**TINY, "dataset": "digits", "epochs": 2, "schedule": "fast", **kw}, out=str(out)
    )


def test_loss_falls_and_masks_stay_fixed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", seed=3)
    metrics = train(cfg, progress=False)
    history = load_checkpoint(tmp_path / "run" / FINAL).meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] < 2.3
    assert metrics["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    model, ckpt = load_model(tmp_path / "run" / FINAL)
    fresh = mask_buffers(create_model(ckpt.spec))
    trained = mask_buffers(model)
    assert len(trained) == 10
    assert all(torch.equal(fresh[k], trained[k]) for k in fresh)  # unchanged by training
    assert all(not m.requires_grad for m in trained.values())


def test_run_folder_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", epochs=1, max_steps=2)
    train(cfg, progress=False)
    before = (tmp_path / "run" / FINAL).read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / FINAL).read_bytes() == before
    with pytest.raises(ConfigError, match="different configuration"):
        train(_cfg(tmp_path / "run", epochs=1, max_steps=2, seed=9), resume=True, progress=False)


def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", epochs=1, max_steps=2)
    first = train(cfg, progress=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert train(cfg, resume=True, progress=False) == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == files
    more = train(_cfg(tmp_path / "run", epochs=1, max_steps=3), resume=True, progress=False)
    assert more["steps"] == 3  # a longer run of the same configuration continues


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=1e-6, rtol=0), key


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole = _cfg(tmp_path / "whole", epochs=2)
    train(whole, progress=False)
    out = tmp_path / "killed"
    args = [
        "train", "--arch", "resnet18", "--width", "0.125", "--defective", "--keep-prob", "0.5",
        "--dataset", "digits", "--epochs", "2", "--schedule", "fast", "--out", str(out),
        "--quiet",
    ]  # fmt: skip
    # The child trains with the thread count this process uses (tests/conftest.py), so
    # OMP_NUM_THREADS cannot make its float results differ from the uninterrupted run.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "defcnn.cli", *args, "--checkpoint-seconds", "0.3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / LAST).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved_step = load_checkpoint(out / LAST).meta["step"]
    n_train = len(load_dataset("digits", progress=False).train_y)
    assert 0 < saved_step < 2 * steps_per_epoch(n_train, whole), "kill landed outside the run"
    assert not (out / FINAL).exists()
    from defcnn.cli import main

    assert main([*args, "--resume"]) == 0
    _assert_same_weights(tmp_path / "whole" / FINAL, out / FINAL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_step(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "defcnn.cli", "train", "--arch", "resnet18", "--width", "0.125", "--defective",
        "--keep-prob", "0.5", "--dataset", "digits", "--epochs", "1", "--schedule", "fast",
        "--batch-size", "16", "--max-steps", "1", "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_checkpoint(out / FINAL)
    assert ddp.meta["metrics"]["world_size"] == 2

    # One process doing the same step: the global batch split into the two ranks' shards,
    # each with its own BatchNorm statistics (SyncBatchNorm is CUDA-only), gradients averaged.
    cfg = TrainConfig.from_dict(ddp.meta["train_config"])
    data = load_dataset("digits", progress=False)
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = create_model(ddp.spec).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    images, labels = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    rows, x = global_batch(images, epoch_order(len(images), cfg.seed, 0), 0, 0, cfg)
    y = labels[rows]
    losses = [F.cross_entropy(model(xs), ys) for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True)]
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, 0, steps_per_epoch(len(images), cfg))
    ((losses[0] + losses[1]) / 2).backward()
    opt.step()
    for name, param in model.named_parameters():
        assert torch.allclose(param.detach(), ddp.state_dict[name], atol=1e-5), name
    assert not torch.equal(
        model.state_dict()["net.fc.weight"], create_model(ddp.spec).state_dict()["net.fc.weight"]
    )


def test_schedules() -> None:
    paper = TrainConfig(dataset="cifar10", epochs=350, schedule="paper", out="x")
    assert lr_at(paper, 0, 10) == pytest.approx(0.1)
    assert lr_at(paper, 149 * 10 + 9, 10) == pytest.approx(0.1)
    assert lr_at(paper, 150 * 10, 10) == pytest.approx(0.01)
    assert lr_at(paper, 250 * 10, 10) == pytest.approx(0.001)
    fast = TrainConfig(dataset="cifar10", epochs=10, schedule="fast", out="x")
    rates = [lr_at(fast, s, 10) for s in range(100)]
    assert max(rates) == pytest.approx(0.1)
    assert rates[0] < rates[10] and rates[-1] < 0.01
    assert TrainConfig(dataset="digits", out="x").lr == pytest.approx(0.1 * 32 / 128)


def test_a_run_stops_at_the_first_check_reaching_its_accuracy_and_stays_stopped(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    metrics = train(_cfg(out, stop_at_accuracy=0.01, eval_every=3), progress=False)
    assert metrics["stopped_at_step"] == 3 == metrics["steps"]  # the first check, step 3
    assert metrics["test_accuracy"] >= 0.01
    per_epoch = steps_per_epoch(len(load_dataset("digits").train_x), _cfg(out))
    assert metrics["stopped_at_epoch"] == pytest.approx(3 / per_epoch)
    history = load_checkpoint(out / FINAL).meta["history"]
    assert history[-1]["step"] == 3 and history[-1]["test_accuracy"] == metrics["test_accuracy"]
    before = load_checkpoint(out / FINAL).state_dict
    again = train(_cfg(out, stop_at_accuracy=0.01, eval_every=3), resume=True, progress=False)
    assert again["steps"] == 3 and again["stopped_at_step"] == 3  # resuming trains no further
    after = load_checkpoint(out / FINAL).state_dict
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_band_stop_ends_at_the_first_check_within_it_and_checks_tighten_near_it(
    tmp_path: Path,
) -> None:
    target, within, every = 0.9, 0.01, 8
    metrics = train(
        _cfg(tmp_path / "run", stop_at_accuracy=target, stop_within=within, eval_every=every),
        progress=False,
    )
    checks = metrics["checks"]
    steps = [c["step"] for c in checks]
    inside = [abs(c["test_accuracy"] - target) <= within for c in checks]
    # digits' accuracy crosses 0.89-0.91 at several steps of this schedule
    assert metrics["stopped_at_step"] == steps[-1] == metrics["steps"]
    assert inside[-1] and not any(inside[:-1])  # the first check within the band, not before
    assert metrics["test_accuracy"] == checks[-1]["test_accuracy"]
    near = next(i for i, c in enumerate(checks) if c["test_accuracy"] >= target - NEAR_TARGET)
    assert all(s % every == 0 or s == 45 for s in steps[: near + 1])  # 45 steps an epoch
    assert all(b - a == every // 8 for a, b in zip(steps[near:-1], steps[near + 1 :], strict=True))


def test_a_target_never_reached_trains_the_whole_schedule(tmp_path: Path) -> None:
    metrics = train(
        _cfg(tmp_path / "run", stop_at_accuracy=1.0, eval_every=2, max_steps=5), progress=False
    )
    assert metrics["steps"] == 5 and metrics["stopped_at_step"] is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"stop_at_accuracy": 0.0}, "stop_at_accuracy"),
        ({"stop_at_accuracy": 1.5}, "stop_at_accuracy"),
        ({"stop_at_accuracy": 0.5, "eval_every": 0}, "eval_every"),
        ({"eval_every": 10}, "only applies with stop_at_accuracy"),
        ({"stop_at_accuracy": 0.5, "stop_within": 0.0}, "stop_within"),
        ({"stop_at_accuracy": 0.5, "stop_within": 1.0}, "stop_within"),
        ({"stop_within": 0.01}, "only applies with stop_at_accuracy"),
    ],
)
def test_stop_settings_are_checked(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **kw)
