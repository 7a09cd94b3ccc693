"""Batches from the cache: right rows, right labels, every position once."""

from __future__ import annotations

import numpy as np
import torch

from skinml.data.loader import CachedBatches


def test_batches_follow_the_order_and_keep_labels_aligned():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    rows = np.array([9, 7, 5, 3, 1])
    labels = np.array([0, 1, 2, 3, 4])
    batches = CachedBatches(images, rows, labels, batch_size=2, device=torch.device("cpu"))
    seen = [(int(i[0, 0, 0]), int(label)) for x, y in batches.epoch(np.array([4, 0, 2, 1, 3]))
            for i, label in zip(x, y, strict=True)]
    assert sorted(seen) == sorted(zip(rows.tolist(), labels.tolist(), strict=True))
    assert len(list(batches.epoch(np.arange(5), drop_last=True))) == 2


def test_stopping_early_does_not_hang():
    images = np.zeros((100, 2, 2, 3), dtype=np.uint8)
    batches = CachedBatches(images, np.arange(100), np.zeros(100), 1, torch.device("cpu"),
                            prefetch=1)
    for i, _ in enumerate(batches.epoch()):
        if i == 2:
            break
