"""The model zoo by name: one `ModelSpec` describes a model, `create_model` builds it.

A spec is plain data (it round-trips through JSON), so a checkpoint records the spec
and rebuilding the model from it gives the same modules, masks included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from defcnn.errors import ConfigError
from defcnn.layers.defective import make_defective
from defcnn.layers.normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize
from defcnn.models.densenet import densenet121
from defcnn.models.resnet import resnet18, resnet18_imagenet, resnet50
from defcnn.models.senet import senet18
from defcnn.models.vgg import vgg19

_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class Arch:
    """A registered architecture: its builder, native input size and stages."""

    build: Callable[[int, float], nn.Module]
    input_size: int
    stages: tuple[str, ...]
    default_defective: tuple[str, ...]


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(resnet18, 32, _RESNET_STAGES, ("stem", "layer1", "layer2")),
    "resnet50": Arch(resnet50, 32, _RESNET_STAGES, ("stem", "layer1", "layer2")),
    "vgg19": Arch(
        vgg19, 32, tuple(f"conv{i}" for i in range(1, 17)), ("conv1", "conv2", "conv3", "conv4")
    ),
    "densenet121": Arch(
        densenet121, 32, ("dense1", "dense2", "dense3", "dense4"), ("dense1", "dense2")
    ),
    "senet18": Arch(senet18, 32, _RESNET_STAGES, ("stem", "layer1", "layer2")),
    "resnet18_imagenet": Arch(resnet18_imagenet, 224, _RESNET_STAGES, ("stem", "layer1", "layer2")),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: architecture, size and its defects.

    ``stages=None`` means the paper's default placement for the architecture.
    ``keep_prob`` and the mask fields matter only when ``defective`` is true.
    """

    arch: str
    num_classes: int = 10
    width: float = 1.0
    defective: bool = False
    keep_prob: float = 0.1
    stages: tuple[str, ...] | None = None
    shared_mask: bool = False
    mask_seed: int = 0
    input_size: int | None = None
    mean: tuple[float, ...] = field(default=CIFAR10_MEAN)
    std: tuple[float, ...] = field(default=CIFAR10_STD)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.width > 0:
            raise ConfigError(f"width must be > 0, got {self.width}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ConfigError(f"keep_prob must be in (0, 1], got {self.keep_prob}")
        bad = set(self.stages or ()) - set(ARCHS[self.arch].stages)
        if bad:
            known = ", ".join(ARCHS[self.arch].stages)
            raise ConfigError(f"stages {sorted(bad)} unknown for {self.arch}; choose from {known}")

    @property
    def resolved_input_size(self) -> int:
        return self.input_size or ARCHS[self.arch].input_size

    @property
    def defective_stages(self) -> tuple[str, ...]:
        """Stages that carry masks: none for a standard model or keep probability 1."""
        if not self.defective or self.keep_prob == 1.0:
            return ()
        return self.stages if self.stages is not None else ARCHS[self.arch].default_defective

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model spec fields: {sorted(unknown)}")
        kw = dict(data)
        for key in ("stages", "mean", "std"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


class Classifier(nn.Module):
    """Normalisation followed by the network: takes [0, 1] pixels, returns logits."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def defect_sites(net: nn.Module, stages: tuple[str, ...]) -> list[str]:
    """Names of the defect placeholders in `net` that belong to the given top-level stages."""
    return [
        name
        for name, _ in net.named_modules()
        if name.split(".")[0] in stages and name.rsplit(".", 1)[-1].startswith("defect")
    ]


def create_model(spec: ModelSpec | str, **overrides: Any) -> Classifier:
    """Build the model a spec (or an arch name plus spec fields) describes.

    Parameters are initialised from the global torch RNG; masks from ``mask_seed`` only,
    so the same seed gives the same masks whatever the initialisation.
    """
    if isinstance(spec, str):
        spec = ModelSpec(arch=spec, **overrides)
    elif overrides:
        spec = ModelSpec.from_dict({**spec.to_dict(), **overrides})
    arch = ARCHS[spec.arch]
    model = Classifier(arch.build(spec.num_classes, spec.width), spec.mean, spec.std)
    sites = defect_sites(model.net, spec.defective_stages)
    make_defective(
        model,
        [f"net.{s}" for s in sites],
        keep_prob=spec.keep_prob,
        seed=spec.mask_seed,
        input_size=(3, spec.resolved_input_size, spec.resolved_input_size),
        shared=spec.shared_mask,
    )
    return model


def list_models() -> list[str]:
    """Registered architecture names."""
    return sorted(ARCHS)
