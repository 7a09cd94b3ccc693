"""Batches from the decode-once cache, gathered by background threads and sent to the device.

A batch is one `np.take` of the memmap (rows sorted, so reads are mostly sequential)
written straight into pinned memory when the device is a GPU, then moved with
`non_blocking=True` while the previous batch trains: the GPU does not wait on the disk.
On a GPU a few threads gather batches at once (numpy's copy releases the GIL); batches
still arrive in order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 (B, H, W, 3)
    labels: torch.Tensor  # int64 (B,)
    clinical: torch.Tensor | None  # float32 (B, core.clinical.WIDTH) for a fusion model


class CachedBatches:
    """Iterate Batch(images, labels, clinical) on `device` for a given order.

    `clinical` (one vector per row, `data.clinical`) rides along only for a model that
    fuses metadata; without it a batch's `clinical` is None.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 batch_size: int, device: torch.device, prefetch: int = 4,
                 clinical: np.ndarray | None = None) -> None:
        if len(rows) != len(labels) or (clinical is not None and len(clinical) != len(rows)):
            raise ValueError("rows, labels and clinical vectors differ in length")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) and not 0 <= self.rows.min() <= self.rows.max() < len(images):
            raise ValueError("rows point outside the cached images")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.clinical = None if clinical is None else np.asarray(clinical, dtype=np.float32)
        self.batch_size = batch_size
        self.device = device
        self.prefetch = prefetch
        self.pin = device.type == "cuda"
        # On a CPU the training step needs the cores; one gatherer keeps ahead of it.
        self.threads = min(4, os.cpu_count() or 1) if self.pin else 1

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, order: np.ndarray | None = None, drop_last: bool = False
              ) -> Iterator[Batch]:
        """Batches visiting positions `order` (default: all, in order)."""
        order = np.arange(len(self.rows)) if order is None else np.asarray(order)
        stop = len(order) - len(order) % self.batch_size if drop_last else len(order)
        if stop == 0 and len(order):
            stop = len(order)  # fewer images than one batch: keep them
        batches = (order[start:start + self.batch_size]
                   for start in range(0, stop, self.batch_size))
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="skinml-batches") as pool:
            try:
                for positions in batches:
                    pending.append(pool.submit(self._gather, positions))
                    if len(pending) > self.prefetch:
                        yield self._to_device(pending.popleft().result())
                while pending:
                    yield self._to_device(pending.popleft().result())
            finally:
                for future in pending:  # the consumer stopped early: drop what is queued
                    future.cancel()

    def _to_device(self, batch: Batch) -> Batch:
        def move(part: torch.Tensor) -> torch.Tensor:
            return part.to(self.device, non_blocking=True)
        return Batch(move(batch.images), move(batch.labels),
                     None if batch.clinical is None else move(batch.clinical))

    def _gather(self, positions: np.ndarray) -> Batch:
        positions = positions[np.argsort(self.rows[positions], kind="stable")]
        images = torch.empty((len(positions), *self.images.shape[1:]), dtype=torch.uint8,
                             pin_memory=self.pin)
        # mode="clip" writes straight into `out` ("raise" would buffer a second copy); the
        # rows were checked to be in range when the batches were made.
        np.take(self.images, self.rows[positions], axis=0, out=images.numpy(), mode="clip")
        labels = torch.from_numpy(self.labels[positions])
        clinical = None if self.clinical is None else torch.from_numpy(self.clinical[positions])
        if self.pin:
            labels = labels.pin_memory()
            clinical = None if clinical is None else clinical.pin_memory()
        return Batch(images, labels, clinical)
