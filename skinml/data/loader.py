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

import numpy as np
import torch


class CachedBatches:
    """Iterate (uint8 images (B, H, W, 3), int64 labels) on `device` for a given order."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 batch_size: int, device: torch.device, prefetch: int = 4) -> None:
        if len(rows) != len(labels):
            raise ValueError("rows and labels differ in length")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) and not 0 <= self.rows.min() <= self.rows.max() < len(images):
            raise ValueError("rows point outside the cached images")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.device = device
        self.prefetch = prefetch
        self.pin = device.type == "cuda"
        # On a CPU the training step needs the cores; one gatherer keeps ahead of it.
        self.threads = min(4, os.cpu_count() or 1) if self.pin else 1

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, order: np.ndarray | None = None, drop_last: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return (images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True))

    def _gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions[np.argsort(self.rows[positions], kind="stable")]
        images = torch.empty((len(positions), *self.images.shape[1:]), dtype=torch.uint8,
                             pin_memory=self.pin)
        # mode="clip" writes straight into `out` ("raise" would buffer a second copy); the
        # rows were checked to be in range when the batches were made.
        np.take(self.images, self.rows[positions], axis=0, out=images.numpy(), mode="clip")
        labels = torch.from_numpy(self.labels[positions])
        return images, labels.pin_memory() if self.pin else labels
