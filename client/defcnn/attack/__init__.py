"""White-box attacks on surrogate models, for transfer attacks on the served model."""

from defcnn.attack.cw import CWL2
from defcnn.attack.gradient import DIFGSM, FGSM, MIFGSM, PGD, Attack
from defcnn.attack.transfer import (
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
