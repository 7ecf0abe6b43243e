"""The defective layer: exact zero count, seeding, fixed masks, exact zeros, keep 1.0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defcnn.errors import ConfigError
from defcnn.layers.defective import (
    DefectiveMask,
    derive_seed,
    draw_mask,
    make_defective,
    mask_buffers,
    zero_count,
)


@pytest.mark.parametrize("keep_prob", [0.7, 0.5, 0.3, 0.1, 0.05, 1.0])
@pytest.mark.parametrize("shape", [(1, 64, 32, 32), (1, 3, 5, 7), (1, 10, 1, 1)])
def test_mask_has_exact_zero_count(keep_prob: float, shape: tuple[int, ...]) -> None:
    mask = draw_mask(shape, keep_prob, seed=3)
    n = mask.numel()
    expected = round((1 - keep_prob) * n + 1e-9)
    assert zero_count(keep_prob, n) == expected
    assert int((mask == 0).sum()) == expected
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.shape == shape


def test_zero_count_rounds_halves_up_and_survives_float_error() -> None:
    assert zero_count(0.5, 3) == 2  # 1.5 rounds up
    assert zero_count(0.5, 1) == 1  # 0.5 rounds up too (Python round() would give 0)
    assert zero_count(0.7, 10) == 3  # (1 - 0.7) * 10 = 2.9999999999999996
    assert zero_count(0.1, 64 * 32 * 32) == 58982


def test_mask_depends_only_on_seed() -> None:
    a = draw_mask((1, 8, 6, 6), 0.5, seed=1)
    b = draw_mask((1, 8, 6, 6), 0.5, seed=1)
    c = draw_mask((1, 8, 6, 6), 0.5, seed=2)
    torch.manual_seed(123)  # the global RNG plays no part
    d = draw_mask((1, 8, 6, 6), 0.5, seed=1)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_layer_seeds_are_independent_of_each_other() -> None:
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert len({derive_seed(0, "a"), derive_seed(0, "b"), derive_seed(1, "a")}) == 3


def test_shared_mask_repeats_one_spatial_pattern() -> None:
    mask = draw_mask((1, 16, 8, 8), 0.25, seed=0, shared=True)
    assert mask.shape == (1, 16, 8, 8)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert int((mask[0, 0] == 0).sum()) == zero_count(0.25, 64)


def test_masked_neurons_are_exactly_zero_for_any_input() -> None:
    layer = DefectiveMask((1, 4, 5, 5), 0.3, seed=7)
    zeros = layer.mask == 0
    for x in (
        torch.randn(9, 4, 5, 5) * 1e6,
        torch.full((2, 4, 5, 5), -3.5),
        torch.randn(3, 4, 5, 5, dtype=torch.float64),
    ):
        for train_mode in (True, False):
            layer.train(train_mode)
            y = layer(x)
            assert torch.all(y[zeros.expand_as(y)] == 0)
            assert torch.equal(y[~zeros.expand_as(y)], x[~zeros.expand_as(x)])  # no 1/p rescale


def test_mask_is_a_buffer_ending_in_mask_and_not_a_parameter() -> None:
    layer = DefectiveMask((1, 2, 3, 3), 0.5, seed=0)
    assert list(layer.state_dict()) == ["mask"]
    assert list(layer.parameters()) == []


def _small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(4),
    )


def test_make_defective_wraps_named_layers_of_any_cnn_with_real_output_shapes() -> None:
    model = _small_cnn()
    model(torch.zeros(1, 3, 21, 21))  # materialise the lazy head
    make_defective(model, ["1", "4"], keep_prob=0.5, seed=0, input_size=(3, 21, 21))
    masks = mask_buffers(model)
    assert set(masks) == {"1.1.mask", "4.1.mask"}
    assert masks["1.1.mask"].shape == (1, 6, 21, 21)
    assert masks["4.1.mask"].shape == (1, 5, 10, 10)  # (21 - 3) // 2 + 1 = 10, found by probing
    out = model[:5](torch.randn(3, 3, 21, 21))
    assert torch.all(out[(masks["4.1.mask"] == 0).expand_as(out)] == 0)


def test_make_defective_rejects_unknown_layers_and_bad_keep_prob() -> None:
    with pytest.raises(ConfigError, match="no such layers"):
        make_defective(_small_cnn(), ["9"], keep_prob=0.5, seed=0)
    with pytest.raises(ConfigError, match="keep_prob"):
        make_defective(_small_cnn(), ["1"], keep_prob=0.0, seed=0)


def test_keep_prob_one_leaves_the_model_untouched() -> None:
    model = _small_cnn()
    model(torch.zeros(1, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_defective(model, ["1", "4"], keep_prob=1.0, seed=0, input_size=(3, 8, 8))
    assert list(model.state_dict()) == list(before)
    assert not mask_buffers(model)
