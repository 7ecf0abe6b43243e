"""Names the CLI offers as choices, kept free of heavy imports so `defcnn --help` and the
torch-free stages (the server) can build the parser without loading torch.

The registries that implement these names check against them (see tests/unit/test_repo.py).
"""

from __future__ import annotations

ARCH_NAMES = ("densenet121", "resnet18", "resnet18_imagenet", "resnet50", "senet18", "vgg19")
DATASETS = ("digits", "cifar10", "imagefolder")
SCHEDULES = ("paper", "fast")
