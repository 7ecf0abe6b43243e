"""Training settings: one object, filled from the CLI, written beside every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from defcnn.errors import ConfigError
from defcnn.models.registry import ModelSpec
from defcnn.names import SCHEDULES

PAPER_LR, PAPER_BATCH = 0.1, 128
# Per-data-set presets for settings left unset. The digits set has 1,437 training images
# of 8x8 scans blown up to 32x32: batch 128 would give 12 steps an epoch, and a 4-pixel
# crop shift is half a stroke, so it trains with smaller batches and gentler crops.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"batch_size": 32, "crop_pad": 2, "flip": False},
}
NEAR_TARGET = 0.05  # stop_within: from this close to the target, checks run 8x as often
_PAPER_AUGMENT = {"batch_size": PAPER_BATCH, "crop_pad": 4, "flip": True}
# The default of a setting resolved on construction (from the preset, or from the batch
# size for lr): typed as the resolved value, since no constructed config holds it.
FROM_PRESET: Any = None


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``seed`` fixes masks (unless ``mask_seed`` is set), init and data order.

    The paper's recipe is the default: SGD lr 0.1, momentum 0.9, weight decay 5e-4,
    batch 128, random crop with padding 4 and horizontal flip. ``schedule="paper"`` is
    the step schedule (x0.1 at 150/350 and 250/350 of the epochs); ``"fast"`` is a
    short warm-up then linear decay to zero, for runs of a few epochs. Fields left
    unset (``None``) are resolved on construction: batch size, crop padding and flips from the
    data set's preset, and lr = 0.1 x batch / 128 (the paper's lr, scaled linearly).

    ``stop_at_accuracy`` ends the run at the first check (every ``eval_every`` steps, by
    default a quarter epoch, and at each epoch's end) whose test accuracy reaches it: how an
    accuracy-matched control is made, a standard model stopped at a defective one's accuracy.
    With ``stop_within`` the check must land within that distance of it instead, on either
    side: at a high learning rate accuracy jumps a few points between checks, so "the first
    check past the target" can overshoot it; and once a check comes within ``NEAR_TARGET``
    of the target, checks run eight times as often. The test split picks the stopping step, so
    the stopped model's test accuracy is selected, not held out; metrics.json lists every
    check and says where it stopped.
    """

    arch: str = "resnet18"
    width: float = 1.0
    defective: bool = False
    keep_prob: float = 0.1
    stages: tuple[str, ...] | None = None
    shared_mask: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    download: bool = False
    epochs: int = 350
    batch_size: int = FROM_PRESET
    lr: float = FROM_PRESET
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "paper"
    crop_pad: int = FROM_PRESET
    flip: bool = FROM_PRESET
    seed: int = 0
    mask_seed: int | None = None
    device: str = "auto"
    amp: bool = True
    out: str = "runs/default"
    checkpoint_seconds: float = 300.0
    max_steps: int | None = None
    stop_at_accuracy: float | None = None
    eval_every: int | None = None
    stop_within: float | None = None

    def __post_init__(self) -> None:
        preset = {**_PAPER_AUGMENT, **DATASET_PRESETS.get(self.dataset, {})}
        for name, value in preset.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.lr is None:
            object.__setattr__(self, "lr", PAPER_LR * self.batch_size / PAPER_BATCH)
        if self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be >= 0, got {self.crop_pad}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.stop_at_accuracy is not None and not 0 < self.stop_at_accuracy <= 1:
            raise ConfigError(f"stop_at_accuracy must be in (0, 1], got {self.stop_at_accuracy}")
        if self.eval_every is not None:
            if self.eval_every < 1:
                raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
            if self.stop_at_accuracy is None:
                raise ConfigError("eval_every only applies with stop_at_accuracy")
        if self.stop_within is not None:
            if not 0 < self.stop_within < 1:
                raise ConfigError(f"stop_within must be in (0, 1), got {self.stop_within}")
            if self.stop_at_accuracy is None:
                raise ConfigError("stop_within only applies with stop_at_accuracy")

    def model_spec(self, num_classes: int, input_size: int) -> ModelSpec:
        """The model this run trains, for a data set with `num_classes` classes."""
        return ModelSpec(
            arch=self.arch,
            num_classes=num_classes,
            width=self.width,
            defective=self.defective,
            keep_prob=self.keep_prob,
            stages=self.stages,
            shared_mask=self.shared_mask,
            mask_seed=self.seed if self.mask_seed is None else self.mask_seed,
            input_size=input_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if kw.get("stages") is not None:
            kw["stages"] = tuple(kw["stages"])
        return cls(**kw)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimiser step `step` (0-based) under the run's schedule."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "paper":
        epoch = step // steps_per_epoch
        drops = sum(epoch >= round(cfg.epochs * m / 350) for m in (150, 250))
        return cfg.lr * 0.1**drops
    warmup = max(1, round(0.15 * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / (total - warmup + 1))
