"""Suite-wide settings that keep results independent of the machine's thread settings.

Float results of training and attacks depend on torch's intra-op thread count (reduction
order), and OMP_NUM_THREADS changes its default: a model trained under
OMP_NUM_THREADS=1 differs measurably from one trained with two threads. Every test runs
with the same count, whatever the environment says.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

TORCH_THREADS = 2


@pytest.fixture(autouse=True, scope="session")
def _fixed_torch_threads() -> Iterator[None]:
    if importlib.util.find_spec("torch") is None:  # a serving-only environment
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(before)
