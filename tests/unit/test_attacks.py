"""White-box attacks: agree with ART, break an undefended model, and keep their invariants."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from defcnn.attack import (
    CWL2,
    DIFGSM,
    FGSM,
    MIFGSM,
    PGD,
    PRESETS,
    Attack,
    Ensemble,
    craft,
    make_attack,
    quantize,
    to_uint8,
)
from defcnn.checkpoint import load_model
from defcnn.data import load_dataset
from defcnn.errors import ConfigError
from defcnn.training import FINAL, TrainConfig, train

EPS, STEP = 16 / 255, 1 / 255


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """One tiny undefended ResNet-18 on digits (~5 s on 2 cores), shared by the module."""
    out = tmp_path_factory.mktemp("surrogate") / "run"
    cfg = TrainConfig(arch="resnet18", width=0.125, dataset="digits", epochs=2,
                      schedule="fast", seed=0, out=str(out))  # fmt: skip
    train(cfg, progress=False)
    model, _ = load_model(Path(out) / FINAL)
    return model.eval()


@pytest.fixture(scope="module")
def clean(surrogate: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctly classified test images (float [0, 1]) and labels; checks clean accuracy."""
    data = load_dataset("digits", progress=False)
    x = torch.from_numpy(data.test_x).float() / 255
    y = torch.from_numpy(data.test_y).long()
    with torch.no_grad():
        right = surrogate(x).argmax(1) == y
    assert right.float().mean() > 0.8  # otherwise "success" would mean nothing
    return x[right][:128], y[right][:128]


def _success(model: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) != y).float().mean().item()


# --- agreement with ART ------------------------------------------------------------------


def _art(name: str, model: nn.Module, batch: int):
    from art.attacks.evasion import (
        FastGradientMethod,
        MomentumIterativeMethod,
        ProjectedGradientDescent,
    )
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)
    clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                            nb_classes=10, clip_values=(0.0, 1.0))  # fmt: skip
    common = {"eps": EPS, "batch_size": batch}
    iterative = {**common, "eps_step": STEP, "max_iter": 20, "verbose": False}
    return {
        "fgsm": lambda: FastGradientMethod(clf, **common),
        "pgd": lambda: ProjectedGradientDescent(clf, num_random_init=0, **iterative),
        "mifgsm": lambda: MomentumIterativeMethod(clf, decay=1.0, **iterative),
    }[name]()


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("fgsm", FGSM(eps=EPS)),
        ("pgd", PGD(eps=EPS, step=STEP, steps=20)),
        ("mifgsm", MIFGSM(eps=EPS, step=STEP, steps=20, decay=1.0)),
    ],
)
def test_matches_art(surrogate: nn.Module, clean: tuple, name: str, ours: Attack) -> None:
    x, y = clean[0][:64], clean[1][:64]
    theirs = _art(name, surrogate, batch=len(x)).generate(x.numpy(), y.numpy())
    surrogate.zero_grad(set_to_none=True)  # ART's loss.backward() fills the weights' .grad
    adv = ours(surrogate, x, y)
    # Same update order, normalisation and projection as ART: measured identical (max
    # diff 0.0). The 1e-5 slack only covers float summation order on other BLAS builds.
    assert (adv - torch.from_numpy(theirs)).abs().max().item() <= 1e-5


# --- white-box success -------------------------------------------------------------------

# Measured on this surrogate (seed 0, correctly classified test images, quantized): at
# 16/255 the paper's preset (step 1/255, 20 steps) breaks only ~60% with PGD, ~55% with
# MI/DI-FGSM and ~44% with FGSM, and more steps do not help (PGD-40: 64%). Digits are 8x8
# scans blown up to 32x32: strokes are 4x4 blocks, 30% of pixels sit at 0 or 1 where the
# [0, 1] clip halves the eps-ball, and clean logit margins are wide. The paper's CIFAR-10
# models fall at 16/255 (benchmarks/white_box_cifar.py measures that); this one needs
# 32/255, with steps large enough to reach it (20 x 1/255 stops at 20/255).
# Measured at 32/255 with two threads and with one (the trained surrogate differs between
# them): PGD (step 2/255) and MI/DI-FGSM (step 4/255) break 98-100%, FGSM 84-89%, CW-L2
# 100%. The bars sit well below, so another CPU's float kernels cannot cross them; they
# still fail for an attack that is broken (a wrong sign, a missing projection step breaks
# far fewer).
# CW-L2 has no eps: its budget is the L2 distance (median ~1.8 here). kappa = 0: the
# paper's kappa = 40 is out of reach for this model, whose clean logit margins are ~3-7
# (0% success even with lr 0.1, c from 10). Judged on the floats: a kappa-0 example sits
# on the decision boundary, so rounding to uint8 undoes ~2% of them.
SUCCESS = [
    (FGSM(eps=32 / 255), 0.70),
    (PGD(eps=32 / 255, step=2 / 255, steps=20), 0.90),
    (MIFGSM(eps=32 / 255, step=4 / 255, steps=20), 0.90),
    (DIFGSM(eps=32 / 255, step=4 / 255, steps=20), 0.90),
    (CWL2(confidence=0.0, steps=50, binary_search_steps=3, lr=0.05), 0.90),
]


@pytest.mark.parametrize(("attack", "bar"), SUCCESS, ids=[type(a).__name__ for a, _ in SUCCESS])
def test_white_box_success(surrogate: nn.Module, clean: tuple, attack: Attack, bar: float) -> None:
    x, y = clean if attack.eps is not None else (clean[0][:48], clean[1][:48])
    adv = attack(surrogate, x, y)
    sent = adv if isinstance(attack, CWL2) else quantize(adv, x, attack.eps)
    assert _success(surrogate, sent, y) >= bar


def test_pgd_success_grows_with_eps(surrogate: nn.Module, clean: tuple) -> None:
    x, y = clean
    rates = [_success(surrogate, make_attack("pgd", k / 255)(surrogate, x, y), y)
             for k in (8, 16, 32)]  # fmt: skip
    assert rates == sorted(rates), rates


# --- invariants, over every L-inf attack -------------------------------------------------

LINF: list[Callable[[int], Attack]] = [
    lambda seed: FGSM(eps=EPS),
    lambda seed: PGD(eps=EPS, step=STEP, steps=5),
    lambda seed: PGD(eps=EPS, step=2 * STEP, steps=5, random_start=True, seed=seed),
    lambda seed: MIFGSM(eps=EPS, step=STEP, steps=5),
    lambda seed: DIFGSM(eps=EPS, step=STEP, steps=5, prob=1.0, seed=seed),
]
IDS = ["fgsm", "pgd", "pgd-random-start", "mifgsm", "difgsm"]


@pytest.mark.parametrize("make", LINF, ids=IDS)
def test_output_in_eps_ball_and_pixel_range(surrogate: nn.Module, clean: tuple, make) -> None:
    x, y = clean[0][:32], clean[1][:32]
    attack = make(0)
    adv = attack(surrogate, x, y)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert (adv - x).abs().max().item() <= EPS + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert (adv != x).any()


@pytest.mark.parametrize("make", LINF, ids=IDS)
def test_craft_stays_within_eps_levels(surrogate: nn.Module, clean: tuple, make) -> None:
    x_u8 = (clean[0][:40] * 255).round().to(torch.uint8).numpy()
    out = craft(make(0), surrogate, x_u8, clean[1][:40].numpy(), batch_size=16, progress=False)
    assert out.dtype == np.uint8 and out.shape == x_u8.shape
    assert np.abs(out.astype(int) - x_u8.astype(int)).max() <= 16  # floor(16/255 * 255)


@pytest.mark.parametrize("make", LINF, ids=IDS)
def test_same_seed_same_output(surrogate: nn.Module, clean: tuple, make) -> None:
    x, y = clean[0][:16], clean[1][:16]
    assert torch.equal(make(3)(surrogate, x, y), make(3)(surrogate, x, y))


@pytest.mark.parametrize("make", [LINF[2], LINF[4]], ids=["pgd-random-start", "difgsm"])
def test_seed_changes_random_attacks(surrogate: nn.Module, clean: tuple, make) -> None:
    x, y = clean[0][:16], clean[1][:16]
    assert not torch.equal(make(3)(surrogate, x, y), make(4)(surrogate, x, y))


@pytest.mark.parametrize(
    "attack",
    [*(make(0) for make in LINF), CWL2(steps=3, binary_search_steps=2)],
    ids=[*IDS, "cwl2"],
)
def test_model_is_left_untouched(surrogate: nn.Module, clean: tuple, attack: Attack) -> None:
    surrogate.zero_grad(set_to_none=True)
    surrogate.train()  # the attack must switch to eval mode and switch back
    before = {k: v.clone() for k, v in surrogate.state_dict().items()}
    try:
        attack(surrogate, clean[0][:8], clean[1][:8])
        assert surrogate.training
    finally:
        surrogate.eval()
    after = surrogate.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. batch-norm stats
    assert all(p.grad is None for p in surrogate.parameters())


def test_cw_returns_originals_it_cannot_break(surrogate: nn.Module, clean: tuple) -> None:
    x, y = clean[0][:8], clean[1][:8]
    adv = CWL2(confidence=1e4, steps=3, binary_search_steps=1)(surrogate, x, y)  # unreachable
    assert torch.equal(adv, x)


# --- rounding to real images -------------------------------------------------------------


def test_to_uint8_clamps_rounding_into_the_eps_ball() -> None:
    clean = torch.tensor([100.0, 100.0, 0.0, 255.0]) / 255
    eps = 2 / 255
    # +2.6 levels rounds to +3, one level past eps; the clip brings it back to +2.
    adv = clean + torch.tensor([2.6, -2.4, -1.0, 1.0]) / 255
    got = to_uint8(adv, clean, eps)
    assert got.tolist() == [102, 98, 0, 255]
    assert torch.equal(quantize(adv, clean, eps), got.float() / 255)
    assert to_uint8(adv).tolist() == [103, 98, 0, 255]  # without a ball: plain rounding


# --- ensembles and presets ---------------------------------------------------------------


def test_ensemble_averages_logits() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(12, 10)) for _ in range(3)]
    x = torch.rand(5, 3, 2, 2)
    expected = sum(m(x) for m in members) / 3
    torch.testing.assert_close(Ensemble(members)(x), expected)


def test_make_attack_uses_the_paper_presets() -> None:
    pgd = make_attack("pgd", 8 / 255)
    assert isinstance(pgd, PGD) and not pgd.random_start
    assert (pgd.eps, pgd.step, pgd.steps) == (8 / 255, 1 / 255, 20)
    assert make_attack("fgsm", 32 / 255).eps == 32 / 255
    assert isinstance(make_attack("difgsm"), DIFGSM)
    mifgsm, cw = make_attack("mifgsm", steps=10), make_attack("cwl2")
    assert isinstance(mifgsm, MIFGSM) and mifgsm.steps == 10
    assert isinstance(cw, CWL2) and cw.confidence == PRESETS["cwl2"]["confidence"] == 40.0
    with pytest.raises(ConfigError, match="no eps"):
        make_attack("cwl2", 16 / 255)
    with pytest.raises(ConfigError, match="unknown attack"):
        make_attack("deepfool")
    with pytest.raises(ConfigError, match="eps"):
        FGSM(eps=16)  # a level count, not a pixel fraction
