"""Request coalescing: concurrent calls gathered into one batched forward pass.

MLflow's scoring server calls `predict` from a thread pool, so concurrent one-image requests
would run as concurrent batch-of-one forward passes fighting over the same cores (or
launching many tiny GPU kernels). Here every call hands its rows to one worker thread,
which runs whatever is queued as one batch and gives each caller exactly its own rows back.
Under load the queue fills while a batch runs, so batches grow by themselves; a lone
request runs at once and never waits for the timer.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_BATCH_ENV = "SKINML_SERVE_MAX_BATCH"
MAX_WAIT_ENV = "SKINML_SERVE_MAX_WAIT_MS"
# How long a call waits for its pass: a forward pass that never returns (a wedged device)
# fails its callers with BatchTimeout instead of holding them, and the server, for ever.
TIMEOUT_ENV, TIMEOUT_SECONDS = "SKINML_SERVE_BATCH_TIMEOUT_S", 300.0
IDLE_SECONDS = 5.0  # a worker thread idle this long ends (the next call starts another)
STOP_SECONDS = 30.0  # at exit, how long a batch still running may take to finish
_LIVE: weakref.WeakSet[Coalescer] = weakref.WeakSet()  # stopped when the interpreter exits


def batch_settings(default_max_batch: int = 64) -> tuple[int, float]:
    """(max_batch, max_wait in seconds) from SKINML_SERVE_MAX_BATCH (64) and
    SKINML_SERVE_MAX_WAIT_MS (5): the one batching of every server and in-process call."""
    return (max(1, int(os.environ.get(MAX_BATCH_ENV, default_max_batch))),
            max(0.0, float(os.environ.get(MAX_WAIT_ENV, "5"))) / 1000)


class BatchTimeout(TimeoutError):
    """A call's pass did not finish in time (HTTP 503 when served)."""


@dataclass
class _Job:
    rows: Any  # (n, ...) numpy array or tensor
    key: Hashable  # calls with different keys (e.g. TTA on/off) are never mixed
    result: Future = field(default_factory=Future)


class Coalescer:
    """`coalescer(rows, key)` -> `run(all queued rows with that key, key)` split back per call.

    `max_batch` caps the rows of one pass (a single larger call still runs whole);
    `max_wait` (seconds) is how long a pass that already gathered several calls waits for
    more to arrive, up to `max_batch`.
    """

    def __init__(self, run: Callable[[Any, Any], np.ndarray], max_batch: int = 64,
                 max_wait: float = 0.005,
                 concat: Callable[[list[Any]], Any] = np.concatenate,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.timeout = timeout  # seconds a call waits for its pass
        self.concat = concat  # joins the calls' rows (numpy arrays, or tensors on a GPU)
        self._queue: queue.Queue[_Job | None] = queue.Queue()  # None: stop
        self._start = threading.Lock()
        self._worker: threading.Thread | None = None
        _LIVE.add(self)

    @classmethod
    def from_environment(cls, run: Callable[[Any, Any], np.ndarray],
                         concat: Callable[[list[Any]], Any] = np.concatenate) -> Coalescer:
        max_batch, max_wait = batch_settings()
        timeout = float(os.environ.get(TIMEOUT_ENV, TIMEOUT_SECONDS))
        return cls(run, max_batch=max_batch, max_wait=max_wait, concat=concat,
                   timeout=timeout)

    def __call__(self, rows: Any, key: Hashable = None) -> np.ndarray:
        job = _Job(rows, key)
        with self._start:  # under the lock a worker that is leaving cannot miss the job
            self._queue.put(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, daemon=True,
                                                name="skinml-coalescer")
                self._worker.start()
        try:
            return job.result.result(timeout=self.timeout)
        except TimeoutError:
            raise BatchTimeout(f"no answer in {self.timeout:g} s: the model's forward pass "
                               f"did not finish ({TIMEOUT_ENV})") from None

    def _serve(self) -> None:
        """Run batches until idle for IDLE_SECONDS, then end: a thread that lived for ever
        would keep its model in memory for ever (a tuning worker loads one per fold)."""
        while True:
            try:
                first = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._start:
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            if first is None:
                return
            jobs = [first]
            try:
                self._gather(jobs)
                for key in dict.fromkeys(job.key for job in jobs):
                    self._run([job for job in jobs if job.key == key], key)
            except BaseException as exc:  # the worker lives on; these callers learn why
                for job in jobs:
                    if not job.result.done():
                        job.result.set_exception(exc)

    def stop(self) -> None:
        """End the worker once the batch it runs is done (at exit: a worker thread killed
        inside a forward pass aborts the process, "terminate called without an active
        exception")."""
        with self._start:
            worker = self._worker
            if worker is None or not worker.is_alive():
                return
            self._queue.put(None)
        worker.join(STOP_SECONDS)

    def _gather(self, jobs: list[_Job]) -> None:
        """Add to `jobs` (one call so far) whatever is queued; if that is more than one call,
        wait a little for more (up to max_batch rows). Each taken job is in `jobs` at once,
        so a failure here still reaches its caller."""
        rows = len(jobs[0].rows)
        deadline = None
        while rows < self.max_batch:
            try:
                if deadline is None:
                    job = self._queue.get_nowait()
                else:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if len(jobs) == 1 or deadline is not None or self.max_wait == 0:
                    break  # a lone call runs at once
                deadline = time.monotonic() + self.max_wait
                continue
            if job is None:  # stop: after this batch
                self._queue.put(None)
                break
            jobs.append(job)
            rows += len(job.rows)

    def _run(self, jobs: list[_Job], key: Hashable) -> None:
        try:
            output = self.run(self.concat([job.rows for job in jobs]), key)
        except BaseException as exc:  # each caller sees the failure of its own pass
            for job in jobs:
                job.result.set_exception(exc)
            return
        start = 0
        for job in jobs:
            job.result.set_result(output[start:start + len(job.rows)])
            start += len(job.rows)


@atexit.register
def _stop_all() -> None:
    """Before the interpreter ends: every worker finishes its batch and ends (after Ctrl-C
    the main thread leaves while a worker may still be inside a forward pass)."""
    for coalescer in list(_LIVE):
        coalescer.stop()
