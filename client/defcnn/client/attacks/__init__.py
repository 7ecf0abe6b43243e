"""White-box attacks on surrogate models, for transfer attacks on the served model."""

from defcnn.client.attacks.cw import CWL2
from defcnn.client.attacks.gradient import DIFGSM, FGSM, MIFGSM, PGD, Attack
from defcnn.client.attacks.transfer import (
    EPS_SWEEP,
    PRESETS,
    Ensemble,
    craft,
    eps_levels,
    make_attack,
    quantize,
    to_uint8,
)

__all__ = [
    "CWL2",
    "DIFGSM",
    "EPS_SWEEP",
    "FGSM",
    "MIFGSM",
    "PGD",
    "PRESETS",
    "Attack",
    "Ensemble",
    "craft",
    "eps_levels",
    "make_attack",
    "quantize",
    "to_uint8",
]
