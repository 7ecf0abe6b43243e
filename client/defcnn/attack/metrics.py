"""Robustness numbers computed from labels, predictions and the images actually sent.

The paper's transfer metric (Luo et al., Table 1): the target's accuracy on adversarial
examples that fool the source and whose clean image the target classifies correctly.
Higher means the defence resists transfer better.
"""

from __future__ import annotations

import numpy as np


def perturbation_norms(clean: np.ndarray, adversarial: np.ndarray) -> dict[str, float]:
    """Mean L-inf and L2 of the perturbations, in [0, 1] pixel units, over all images."""
    delta = adversarial.astype(np.float64) / 255.0 - clean.astype(np.float64) / 255.0
    flat = delta.reshape(len(delta), -1)
    if not len(flat):
        return {"mean_linf": 0.0, "mean_l2": 0.0}
    return {
        "mean_linf": float(np.abs(flat).max(axis=1).mean()),
        "mean_l2": float(np.linalg.norm(flat, axis=1).mean()),
    }


def transfer_metrics(
    labels: np.ndarray,
    source_adv_pred: np.ndarray,
    target_clean_pred: np.ndarray,
    target_adv_pred: np.ndarray,
) -> dict[str, float | int]:
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
    return {
        "images": len(labels),
        "transfer_subset": int(subset.sum()),
        "transfer_accuracy": float(adv_right[subset].mean()) if subset.any() else float("nan"),
        "accuracy_clean": float(target_right.mean()) if len(labels) else float("nan"),
        "accuracy_adversarial": float(adv_right.mean()) if len(labels) else float("nan"),
        "source_fooled": float(fools_source.mean()) if len(labels) else float("nan"),
        "success_rate": float((~adv_right & target_right).sum() / n_right)
        if n_right
        else float("nan"),
    }


def boundary_figure(clean: np.ndarray, best_adv: list[np.ndarray | None]) -> dict[str, float]:
    """The paper's Boundary-attack figure: mean and median of ||delta||^2 / (3*H*W).

    `clean` is float [N, 3, H, W] in [0, 1]; `best_adv[i]` is the closest adversarial image
    found for image i (None when none was found; those are left out and counted).
    """
    values = [
        float(np.sum((adv - x) ** 2) / x.size)
        for x, adv in zip(clean, best_adv, strict=True)
        if adv is not None
    ]
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "images": 0, "missing": len(clean)}
    return {
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "images": len(values),
        "missing": len(clean) - len(values),
    }
