"""Robustness numbers computed from labels, predictions and the images actually sent.

The paper's transfer metric (Luo et al., Table 1): the target's accuracy on adversarial
examples that fool the source and whose clean image the target classifies correctly.
Higher means the defence resists transfer better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defcnn.stats import bootstrap


@dataclass(frozen=True)
class PerturbationNorms:
    """Mean size of the perturbations sent, in [0, 1] pixel units, over all images."""

    mean_linf: float
    mean_l2: float


@dataclass(frozen=True)
class TransferMetrics:
    """One target's numbers for one batch of transferred adversarial examples (NaN where
    the subset a rate is taken over is empty)."""

    images: int
    transfer_subset: int
    transfer_accuracy: float
    accuracy_clean: float
    accuracy_adversarial: float
    source_fooled: float
    success_rate: float


@dataclass(frozen=True)
class BoundaryFigure:
    """The paper's Boundary-attack figure, ||delta||^2/(3HW) of the closest adversarial,
    kept for every decision-based attack, over the images where an adversarial was found,
    with percentile-bootstrap 95% intervals (None when no image had one, and in results
    written before the intervals were added)."""

    mean: float
    median: float
    images: int
    missing: int
    mean_ci: tuple[float, float] | None = None
    median_ci: tuple[float, float] | None = None


def perturbation_norms(clean: np.ndarray, adversarial: np.ndarray) -> PerturbationNorms:
    """Mean L-inf and L2 of the perturbations, in [0, 1] pixel units, over all images."""
    delta = adversarial.astype(np.float64) / 255.0 - clean.astype(np.float64) / 255.0
    flat = delta.reshape(len(delta), -1)
    if not len(flat):
        return PerturbationNorms(mean_linf=0.0, mean_l2=0.0)
    return PerturbationNorms(
        mean_linf=float(np.abs(flat).max(axis=1).mean()),
        mean_l2=float(np.linalg.norm(flat, axis=1).mean()),
    )


def transfer_metrics(
    labels: np.ndarray,
    source_adv_pred: np.ndarray,
    target_clean_pred: np.ndarray,
    target_adv_pred: np.ndarray,
) -> TransferMetrics:
    """The paper's transfer metric plus plain accuracy under attack and success rate.

    - ``transfer_accuracy``: target accuracy on {adv fools the source, target right on clean};
    - ``accuracy_clean`` / ``accuracy_adversarial``: target accuracy on all samples;
    - ``success_rate``: of the images the target gets right when clean, the fraction whose
      adversarial version it gets wrong.
    """
    fools_source = source_adv_pred != labels
    target_right = target_clean_pred == labels
    subset = fools_source & target_right
    adv_right = target_adv_pred == labels
    n_right = int(target_right.sum())
    nan = float("nan")
    return TransferMetrics(
        images=len(labels),
        transfer_subset=int(subset.sum()),
        transfer_accuracy=float(adv_right[subset].mean()) if subset.any() else nan,
        accuracy_clean=float(target_right.mean()) if len(labels) else nan,
        accuracy_adversarial=float(adv_right.mean()) if len(labels) else nan,
        source_fooled=float(fools_source.mean()) if len(labels) else nan,
        success_rate=float((~adv_right & target_right).sum() / n_right) if n_right else nan,
    )


def boundary_figure(clean: np.ndarray, best_adv: list[np.ndarray | None]) -> BoundaryFigure:
    """The paper's Boundary-attack figure: mean and median of ||delta||^2 / (3*H*W).

    `clean` is float [N, 3, H, W] in [0, 1]; `best_adv[i]` is the closest adversarial image
    found for image i (None when none was found; those are left out and counted). The
    intervals bootstrap over the images (seed 0, so a report reproduces).
    """
    values = [
        float(np.sum((adv - x) ** 2) / x.size)
        for x, adv in zip(clean, best_adv, strict=True)
        if adv is not None
    ]
    if not values:
        return BoundaryFigure(mean=float("nan"), median=float("nan"), images=0, missing=len(clean))
    mean, median = bootstrap(values, "mean", seed=0), bootstrap(values, "median", seed=0)
    return BoundaryFigure(
        mean=mean.value,
        median=median.value,
        images=len(values),
        missing=len(clean) - len(values),
        mean_ci=(mean.low, mean.high),
        median_ci=(median.low, median.high),
    )
