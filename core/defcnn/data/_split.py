"""A fixed stratified train/test split, so data sets shipped without one split reproducibly."""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def stratified_split(
    labels: np.ndarray, *, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test) holding about `test_fraction` of every class in test."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train)).astype(np.int64)
    test_idx = rng.permutation(np.concatenate(test)).astype(np.int64)
    return train_idx, test_idx
