"""Transfer attacks: surrogate ensembles, the paper's presets, uint8 rounding and batch crafting.

A transfer attacker crafts on a surrogate it owns (white-box) and submits the result to
the defended model. What it submits must be a real image, so :func:`craft` rounds to
uint8 levels and success is judged on the rounded images, not on the floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from defcnn.attack.cw import CWL2
from defcnn.attack.gradient import DIFGSM, FGSM, MIFGSM, PGD, Attack, model_device
from defcnn.errors import ConfigError


class Ensemble(nn.Module):
    """Averages the logits of several surrogates, so a perturbation must fool them all
    (Liu et al. 2017: ensemble surrogates transfer better than any single one)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.members]).mean(0)


_ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM, "pgd": PGD, "mifgsm": MIFGSM, "difgsm": DIFGSM, "cwl2": CWL2,
}  # fmt: skip

#: The paper's settings. Iterative attacks keep step 1/255 and 20 steps for every eps.
_ITERATIVE = {"eps": 16 / 255, "step": 1 / 255, "steps": 20}
PRESETS: dict[str, dict[str, Any]] = {
    "fgsm": {"eps": 16 / 255},
    "pgd": {**_ITERATIVE, "random_start": False},
    "mifgsm": {**_ITERATIVE, "decay": 1.0},
    "difgsm": {**_ITERATIVE, "decay": 1.0, "prob": 0.5, "resize_rate": 1.1},
    "cwl2": {"confidence": 40.0},
}
#: The paper's eps sweep (FGSM is reported at each).
EPS_SWEEP: tuple[float, ...] = (8 / 255, 16 / 255, 32 / 255)


def make_attack(name: str, eps: float | None = None, **overrides: Any) -> Attack:
    """Build attack `name` from its paper preset; `eps` (and any `overrides`) replace it.

    CW-L2 has no eps (its budget is the L2 distance), so passing one for it is an error.
    """
    key = name.lower()
    if key not in _ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; expected one of {sorted(_ATTACKS)}")
    kwargs = dict(PRESETS[key])
    if eps is not None:
        if "eps" not in kwargs:
            raise ConfigError(f"attack {name!r} takes no eps (it is an L2 attack)")
        kwargs["eps"] = eps
    kwargs.update(overrides)
    try:
        return _ATTACKS[key](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad setting for attack {name!r}: {exc}") from exc


def eps_levels(eps: float) -> int:
    """Whole uint8 levels inside an eps-ball: floor(eps * 255), robust to k/255 rounding."""
    return math.floor(eps * 255 + 1e-6)


def to_uint8(
    x: torch.Tensor, clean: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """Round [0, 1] images to uint8; with `clean` and `eps`, stay inside the eps-ball.

    Rounding alone can push a pixel half a level past eps, so the rounded value is clamped
    to the clean value +/- floor(eps * 255) levels (the clean images come from uint8 data,
    so their levels are integers).
    """
    levels = (x.detach().float() * 255).round()
    if clean is not None and eps is not None:
        base = (clean.detach().float().to(levels.device) * 255).round()
        k = eps_levels(eps)
        levels = torch.minimum(torch.maximum(levels, base - k), base + k)
    return levels.clamp(0, 255).to(torch.uint8)


def quantize(
    x: torch.Tensor, clean: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """:func:`to_uint8` back as float pixels in [0, 1]: what the defended model will see."""
    return to_uint8(x, clean, eps).float() / 255


def craft(
    attack: Attack,
    surrogate: nn.Module,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Craft adversarial uint8 NCHW images on `surrogate` in batches.

    With `device`, the surrogate is moved there first; otherwise the attack runs wherever
    the surrogate already is. The output is quantised and within the attack's eps-ball.
    """
    images_uint8 = np.asarray(images_uint8)
    labels = np.asarray(labels)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise ConfigError(f"expected uint8 images [N, C, H, W], got {images_uint8.dtype} "
                          f"{images_uint8.shape}")  # fmt: skip
    if len(labels) != len(images_uint8):
        raise ConfigError(f"{len(images_uint8)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        surrogate = surrogate.to(device)
    run_on = model_device(surrogate)
    out = np.empty_like(images_uint8)
    bar = tqdm(total=len(images_uint8), desc=type(attack).__name__, unit="img",
               disable=not progress, leave=False)  # fmt: skip
    with bar:
        for start in range(0, len(images_uint8), batch_size):
            stop = start + batch_size
            x0 = torch.from_numpy(images_uint8[start:stop]).to(run_on).float().div_(255)
            y = torch.from_numpy(labels[start:stop].astype(np.int64)).to(run_on)
            adv = attack(surrogate, x0, y)
            out[start:stop] = to_uint8(adv, x0, attack.eps).cpu().numpy()
            bar.update(len(x0))
    return out
