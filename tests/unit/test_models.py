"""The model zoo: the paper's mask placements, widths, stages, and [0, 1] inputs."""

from __future__ import annotations

import pytest
import torch

from defcnn.errors import ConfigError
from defcnn.layers import mask_buffers
from defcnn.layers.defective import zero_count
from defcnn.layers.normalize import CIFAR10_MEAN, CIFAR10_STD
from defcnn.models import ModelSpec, create_model, list_models


def _shape_counts(arch: str, width: float, **kw: object) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for mask in mask_buffers(create_model(arch, width=width, defective=True, **kw)).values():
        counts[tuple(mask.shape)] = counts.get(tuple(mask.shape), 0) + 1
    return counts


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_resnet18_has_the_papers_ten_masks(width: float) -> None:
    c1, c2 = round(64 * width), round(128 * width)
    assert _shape_counts("resnet18", width) == {(1, c1, 32, 32): 5, (1, c2, 16, 16): 5}
    model = create_model("resnet18", width=width, defective=True, keep_prob=0.1)
    keys = sorted(mask_buffers(model))
    assert "net.stem.defect.mask" in keys and "net.layer2.0.shortcut.defect.mask" in keys
    assert all(k.endswith("mask") for k in keys)
    for mask in mask_buffers(model).values():
        assert int((mask == 0).sum()) == zero_count(0.1, mask.numel())


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("vgg19", {(1, 16, 32, 32): 2, (1, 32, 16, 16): 2}),
        ("resnet50", {(1, 16, 32, 32): 4, (1, 32, 16, 16): 4}),
        ("senet18", {(1, 16, 32, 32): 5, (1, 32, 16, 16): 5}),
        ("resnet18_imagenet", {(1, 16, 112, 112): 1, (1, 16, 56, 56): 4, (1, 32, 28, 28): 5}),
    ],
)
def test_default_placements_per_architecture(arch: str, expected: dict) -> None:
    assert _shape_counts(arch, 0.25) == expected


def test_densenet121_masks_both_batchnorms_of_dense_blocks_1_and_2() -> None:
    model = create_model("densenet121", width=0.25, defective=True)
    keys = list(mask_buffers(model))
    assert len(keys) == 2 * (6 + 12)
    assert {k.split(".")[1] for k in keys} == {"dense1", "dense2"}
    growth = 8  # 32 * 0.25
    first = mask_buffers(model)["net.dense1.0.defect1.mask"]
    assert first.shape == (1, 2 * growth, 32, 32)


def test_stage_choice_and_shared_variant() -> None:
    counts = _shape_counts("resnet18", 0.25, stages=("layer3",))
    assert counts == {(1, 64, 8, 8): 5}
    model = create_model("resnet18", width=0.25, defective=True, shared_mask=True)
    for mask in mask_buffers(model).values():
        assert torch.equal(mask, mask[:, :1].expand_as(mask))
    with pytest.raises(ConfigError, match="stages"):
        ModelSpec(arch="resnet18", defective=True, stages=("layer9",))


@pytest.mark.parametrize("arch", list_models())
def test_every_model_takes_unit_pixels_and_returns_logits(arch: str) -> None:
    size = 224 if arch.endswith("imagenet") else 32
    model = create_model(arch, width=0.125, defective=True, num_classes=7).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 7)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(CIFAR10_STD))


def test_normalisation_is_inside_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", width=0.125).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(model(x), model.net(manual), atol=1e-6)


def test_keep_prob_one_is_exactly_the_standard_model() -> None:
    torch.manual_seed(5)
    standard = create_model("resnet18", width=0.125).eval()
    torch.manual_seed(5)
    defective = create_model("resnet18", width=0.125, defective=True, keep_prob=1.0).eval()
    assert list(standard.state_dict()) == list(defective.state_dict())
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(standard(x), defective(x))


def test_masks_depend_on_mask_seed_not_on_init() -> None:
    torch.manual_seed(1)
    a = mask_buffers(create_model("resnet18", width=0.125, defective=True, mask_seed=4))
    torch.manual_seed(2)
    b = mask_buffers(create_model("resnet18", width=0.125, defective=True, mask_seed=4))
    c = mask_buffers(create_model("resnet18", width=0.125, defective=True, mask_seed=5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_spec_round_trips_through_json_dict() -> None:
    spec = ModelSpec(arch="vgg19", width=0.5, defective=True, stages=("conv1",), mask_seed=9)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="arch"):
        ModelSpec(arch="alexnet")
    with pytest.raises(ConfigError, match="keep_prob"):
        ModelSpec(arch="resnet18", keep_prob=1.5)
