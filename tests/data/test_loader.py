"""Batches from the cache: right rows, right labels, every position once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from skinml.data.loader import CachedBatches


def test_batches_follow_the_order_and_keep_labels_aligned():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    rows = np.array([9, 7, 5, 3, 1])
    labels = np.array([0, 1, 2, 3, 4])
    batches = CachedBatches(images, rows, labels, batch_size=2, device=torch.device("cpu"))
    epoch = list(batches.epoch(np.array([4, 0, 2, 1, 3])))
    seen = [(int(i[0, 0, 0]), int(label)) for x, y, _ in epoch
            for i, label in zip(x, y, strict=True)]
    assert all(batch.clinical is None for batch in epoch)  # image-only: no metadata
    assert sorted(seen) == sorted(zip(rows.tolist(), labels.tolist(), strict=True))
    assert len(list(batches.epoch(np.arange(5), drop_last=True))) == 2


@pytest.mark.timeout(30)  # a consumer that stops early used to be able to hang here
def test_stopping_early_drops_the_queued_batches_and_ends_the_gatherer():
    images = np.zeros((100, 2, 2, 3), dtype=np.uint8)
    batches = CachedBatches(images, np.arange(100), np.zeros(100), 1, torch.device("cpu"),
                            prefetch=1)
    before = set(threading.enumerate())
    epoch = batches.epoch()
    taken = [next(epoch) for _ in range(3)]
    gatherers = [t for t in set(threading.enumerate()) - before
                 if t.name.startswith("skinml-batches")]
    epoch.close()  # what a `break` out of the loop does
    assert len(taken) == 3 and gatherers
    for thread in gatherers:
        thread.join(10)
        assert not thread.is_alive()


def test_clinical_vectors_ride_with_their_own_rows():
    """Rows are gathered sorted by cache position; each image keeps its own metadata."""
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    rows = np.array([9, 7, 5, 3, 1])
    clinical = rows[:, None].astype(np.float32).repeat(4, axis=1)  # vector = its image's row
    batches = CachedBatches(images, rows, np.zeros(5), batch_size=3,
                            device=torch.device("cpu"), clinical=clinical)
    for x, _, vectors in batches.epoch(np.array([4, 0, 2, 1, 3])):
        assert vectors.dtype == torch.float32 and vectors.shape == (len(x), 4)
        assert x[:, 0, 0, 0].tolist() == vectors[:, 0].int().tolist()
    with pytest.raises(ValueError, match="differ in length"):
        CachedBatches(images, rows, np.zeros(5), 2, torch.device("cpu"), clinical=clinical[:4])
