"""Checkpoints: masks saved and restored, pickles refused, writes atomic."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from defcnn.atomic import atomic_write
from defcnn.checkpoint import load_checkpoint, load_model, save_checkpoint
from defcnn.errors import CheckpointError
from defcnn.layers import mask_buffers
from defcnn.models import ModelSpec, create_model


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, ModelSpec]:
    spec = ModelSpec(arch="resnet18", width=0.125, defective=True, keep_prob=0.3, mask_seed=11)
    torch.manual_seed(0)
    model = create_model(spec)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, spec, {"classes": list("abcdefghij")})
    return path, model, spec


def test_masks_and_weights_round_trip(tmp_path: Path) -> None:
    path, model, spec = _saved(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec
    assert ckpt.classes == list("abcdefghij")
    assert sum(k.endswith("mask") for k in ckpt.state_dict) == 10
    restored, _ = load_model(path)
    for key, mask in mask_buffers(model).items():
        assert torch.equal(restored.state_dict()[key], mask)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(restored(x), model.eval()(x))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    torch_file = tmp_path / "evil.pt"
    torch.save({"payload": _Payload(marker)}, torch_file)
    for path in (evil, torch_file):
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(foreign)


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path: Path) -> None:
    _, model, _ = _saved(tmp_path)
    wrong = ModelSpec(arch="resnet18", width=0.125)  # standard: no mask buffers
    save_checkpoint(tmp_path / "w.safetensors", model, wrong, {})
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "w.safetensors")


def test_failed_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a server running as another user must read an exported model."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
