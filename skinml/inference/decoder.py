"""The rows of one call decoded into the pixels training saw: on a thread pool (Pillow
releases the GIL while decoding), or batched on the GPU with SKINML_GPU_DECODE=1."""

from __future__ import annotations

import io
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinml.core.errors import SkinmlError
from skinml.data.decode import decode_to_frame
from skinml.data.jpeg_batch import CorruptRowError, decode_batch
from skinml.inference.requests import BadInput, bad_row, decode_base64

MAX_PIXELS = 50_000_000  # 7000x7000; real dermoscopy images are far smaller
DECODE_WORKERS_ENV = "SKINML_DECODE_WORKERS"
# On CUDA, SKINML_GPU_DECODE=1 decodes JPEGs batched on the GPU (nvjpeg): far faster, its
# pixels within a few uint8 levels of training's (tests/data/test_jpeg_batch.py), so it is
# opted into, not the default.
GPU_DECODE_ENV = "SKINML_GPU_DECODE"


class ParallelDecoder:
    """Rows of one call decoded on a thread pool (Pillow releases the GIL while decoding),
    with the function the training cache uses (`decode_to_frame`), so served pixels are the
    training pixels. A bad row raises BadInput naming its row; a lone row decodes in the
    caller's thread (no hand-off for a one-image request). With SKINML_GPU_DECODE=1 on CUDA,
    a chunk's JPEGs decode batched on the GPU instead (`data.jpeg_batch`)."""

    def __init__(self, frame: tuple[int, int], workers: int | None = None,
                 device: torch.device | None = None) -> None:
        self.frame = frame
        self.workers = workers or decode_workers()
        self.gpu: torch.device | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if device is not None:
            self.use(device)

    def use(self, device: torch.device) -> None:
        """Decode on `device` when it is a GPU and SKINML_GPU_DECODE=1, else on the CPU."""
        wanted = os.environ.get(GPU_DECODE_ENV, "0").strip() == "1"
        self.gpu = device if (wanted and torch.device(device).type == "cuda") else None

    def chunks(self, values: Sequence[Any] | pd.Series, size: int
               ) -> Iterator[np.ndarray | torch.Tensor]:
        """(rows, H, W, 3) uint8 chunks of `values` in order; the next chunk decodes while
        the caller uses the current one. A Series is read a chunk at a time: pandas keeps
        strings in Arrow, and turning a whole column into Python strings at once would copy
        the input."""
        ahead: _Pending | None = None
        try:
            for start in range(0, len(values), size):
                rows = (values.iloc[start:start + size].tolist()
                        if isinstance(values, pd.Series) else list(values[start:start + size]))
                submitted = self._submit(rows, start)
                if ahead is not None:
                    yield ahead.result()
                ahead = submitted
            if ahead is not None:
                pixels, ahead = ahead.result(), None
                yield pixels
        finally:
            if ahead is not None:
                ahead.cancel()

    def decode(self, value: Any, row: int) -> np.ndarray:
        """One base64 row as training pixels; BadInput naming `row` if it is no image."""
        raw = self._raw(value, row)
        try:
            return decode_to_frame(io.BytesIO(raw), *self.frame, max_pixels=MAX_PIXELS)
        except SkinmlError as exc:
            raise bad_row(row, str(exc)) from None

    @staticmethod
    def _raw(value: Any, row: int) -> bytes:
        return decode_base64(value, row)

    def _on_gpu(self, values: list[Any], offset: int, gpu: torch.device) -> torch.Tensor:
        raws = [self._raw(value, offset + i) for i, value in enumerate(values)]
        try:
            return decode_batch(raws, *self.frame, gpu, max_pixels=MAX_PIXELS).pixels
        except CorruptRowError as exc:
            raise bad_row(offset + exc.row, str(exc)) from None

    def _submit(self, values: list[Any], offset: int) -> _Pending:
        if self.gpu is not None:
            return _Pending([self._executor().submit(self._on_gpu, values, offset, self.gpu)],
                            whole=True)
        if len(values) == 1 or self.workers == 1:
            done: list[Future] = []
            for i, value in enumerate(values):
                future: Future = Future()
                try:
                    future.set_result(self.decode(value, offset + i))
                except BadInput as exc:
                    future.set_exception(exc)
                done.append(future)
            return _Pending(done)
        pool = self._executor()
        return _Pending([pool.submit(self.decode, value, offset + i)
                         for i, value in enumerate(values)])

    def _executor(self) -> ThreadPoolExecutor:
        # Made on first use, in the process that predicts (never inherited across a fork);
        # its idle threads hold no reference to the model, so the model can still be freed,
        # and the pool is shut down with it.
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="skinml-decode")
                weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
            return self._pool


@dataclass
class _Pending:
    """A chunk being decoded: one future per row, or one for the whole chunk (`whole`)."""

    futures: list[Future]
    whole: bool = False

    def result(self) -> np.ndarray | torch.Tensor:
        try:
            if self.whole:
                return self.futures[0].result()
            return np.stack([future.result() for future in self.futures])
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


def decode_workers() -> int:
    """SKINML_DECODE_WORKERS, else one thread per core (at most 8)."""
    value = os.environ.get(DECODE_WORKERS_ENV, "")
    return max(1, int(value)) if value.strip() else min(8, os.cpu_count() or 1)


