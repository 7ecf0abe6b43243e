"""Checkpoints as safetensors plus JSON metadata: tensors and text only, never pickle.

One file holds the model's state dict (masks included, under keys ending in ``mask``),
a JSON document in the safetensors metadata (format, model spec, class names,
normalisation, metrics, training config, versions) and, for resumable training
checkpoints, the optimiser's tensors under the ``train/`` prefix. Files are written
atomically: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from defcnn.atomic import atomic_write
from defcnn.errors import CheckpointError
from defcnn.models.registry import Classifier, ModelSpec, create_model

FORMAT = "defcnn-checkpoint/1"
_META_KEY = "defcnn"
_TRAIN_PREFIX = "train/"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, split into model weights, metadata and training state."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    train_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    meta: dict[str, Any],
    train_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save `model`'s weights, its spec and `meta` (plus optional training tensors) atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (train_state or {}).items():
        tensors[_TRAIN_PREFIX + key] = value.detach().cpu().contiguous()
    doc = {"format": FORMAT, "spec": spec.to_dict(), **meta}
    metadata = {_META_KEY: json.dumps(doc, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; anything not in our safetensors format is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a defcnn safetensors checkpoint ({exc}); pickled checkpoints "
            "(torch.save .pt/.pth files) are refused because unpickling can run arbitrary code"
        ) from exc
    try:
        doc = json.loads(metadata[_META_KEY])
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        spec = ModelSpec.from_dict(doc.pop("spec"))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: missing or malformed defcnn metadata ({exc})") from exc
    state = {k: v for k, v in tensors.items() if not k.startswith(_TRAIN_PREFIX)}
    train = {k[len(_TRAIN_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_TRAIN_PREFIX)}
    return Checkpoint(spec=spec, state_dict=state, meta=doc, train_state=train)


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Classifier, Checkpoint]:
    """Rebuild the model a checkpoint describes and load its weights (strictly), in eval mode."""
    ckpt = load_checkpoint(path)
    model = create_model(ckpt.spec)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match spec {ckpt.spec}: {exc}") from exc
    return model.to(device).eval(), ckpt
