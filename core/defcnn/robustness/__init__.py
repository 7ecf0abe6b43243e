"""Accuracy under non-adversarial changes to the input: the paper's shape-versus-texture
probe (patch shuffling) and additive Gaussian noise."""

from defcnn.robustness.corruptions import CORRUPTIONS, gaussian_noise, patch_shuffle
from defcnn.robustness.evaluate import (
    CorruptionRow,
    EvaluationResult,
    corruption_table,
    evaluate_corruptions,
)

__all__ = [
    "CORRUPTIONS",
    "CorruptionRow",
    "EvaluationResult",
    "corruption_table",
    "evaluate_corruptions",
    "gaussian_noise",
    "patch_shuffle",
]
