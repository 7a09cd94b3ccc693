"""Batches from the decode-once cache, gathered by a background thread and sent to the device.

A batch is a fancy-indexed read of the memmap (rows sorted, so reads are mostly
sequential), copied into pinned memory when the device is a GPU, and moved with
`non_blocking=True` while the previous batch trains: the GPU does not wait on the disk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

_DONE = object()


class CachedBatches:
    """Iterate (uint8 images (B, H, W, 3), int64 labels) on `device` for a given order."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 batch_size: int, device: torch.device, prefetch: int = 3) -> None:
        if len(rows) != len(labels):
            raise ValueError("rows and labels differ in length")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.device = device
        self.prefetch = prefetch
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, order: np.ndarray | None = None, drop_last: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches visiting positions `order` (default: all, in order)."""
        order = np.arange(len(self.rows)) if order is None else np.asarray(order)
        stop = len(order) - len(order) % self.batch_size if drop_last else len(order)
        if stop == 0 and len(order):
            stop = len(order)  # fewer images than one batch: keep them
        starts = range(0, stop, self.batch_size)
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        halt = threading.Event()

        def produce() -> None:
            try:
                for start in starts:
                    if halt.is_set():
                        return
                    slots.put(self._gather(order[start:start + self.batch_size]))
                slots.put(_DONE)
            except BaseException as exc:  # re-raised in the consumer
                slots.put(exc)

        worker = threading.Thread(target=produce, daemon=True, name="skinml-batches")
        worker.start()
        try:
            while (item := slots.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                images, labels = item
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))
        finally:
            halt.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    slots.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def _gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions[np.argsort(self.rows[positions], kind="stable")]
        images = torch.from_numpy(self.images[self.rows[positions]])
        labels = torch.from_numpy(self.labels[positions])
        if self.pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels
