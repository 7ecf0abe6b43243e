"""Training: the settings object, the resumable loop, evaluation and torchrun support."""

from defcnn.training.config import SCHEDULES, TrainConfig, lr_at
from defcnn.training.loop import FINAL, LAST, evaluate, train

__all__ = ["FINAL", "LAST", "SCHEDULES", "TrainConfig", "evaluate", "lr_at", "train"]
