"""The coalescer alone: concurrent calls share passes, and each gets exactly its rows back."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from skinml.inference import coalescer as module
from skinml.inference.coalescer import Coalescer


class Recorder:
    """A 'model': doubles its rows, slowly enough for a queue to form, and records passes."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.passes: list[tuple[int, object]] = []
        self.values: list[tuple[object, set]] = []  # the distinct row values of each pass
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, rows: np.ndarray, key) -> np.ndarray:
        with self.lock:
            self.passes.append((len(rows), key))
            self.values.append((key, set(rows.ravel().tolist())))
        time.sleep(self.seconds)
        if key == "boom":
            raise ValueError("this pass failed")
        return rows * 2


def test_concurrent_calls_share_passes_and_get_their_own_rows_in_order():
    model = Recorder()
    coalesce = Coalescer(model, max_batch=64, max_wait=0.005)
    requests = [np.arange(i * 10, i * 10 + 1 + i % 3)[:, None] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(coalesce, requests))
    for rows, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer, rows * 2)
    assert sum(n for n, _ in model.passes) == sum(len(r) for r in requests)
    assert len(model.passes) < 32 and max(n for n, _ in model.passes) > 1


def test_a_lone_call_runs_at_once_without_waiting_for_the_timer():
    coalesce = Coalescer(Recorder(seconds=0), max_wait=2.0)
    started = time.perf_counter()
    np.testing.assert_array_equal(coalesce(np.ones((3, 1))), np.full((3, 1), 2.0))
    assert time.perf_counter() - started < 0.5


def test_keys_are_never_mixed_and_a_failed_pass_fails_only_its_callers():
    model = Recorder()
    coalesce = Coalescer(model, max_wait=0.02)
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(coalesce, np.ones((1, 1)), "plain") for _ in range(4)]
        bad = [pool.submit(coalesce, np.full((1, 1), 5.0), "boom") for _ in range(4)]
        for future in good:
            np.testing.assert_array_equal(future.result(), [[2.0]])
        for future in bad:
            with pytest.raises(ValueError, match="this pass failed"):
                future.result()
    # A pass holds the rows of one key only: TTA and plain requests never share a pass.
    assert all(values == ({1.0} if key == "plain" else {5.0}) for key, values in model.values)
    assert {key for _, key in model.passes} == {"plain", "boom"}
    np.testing.assert_array_equal(coalesce(np.ones((1, 1)), "plain"), [[2.0]])  # still serving


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SKINML_SERVE_MAX_BATCH", "8")
    monkeypatch.setenv("SKINML_SERVE_MAX_WAIT_MS", "0")
    coalesce = Coalescer.from_environment(Recorder())
    assert coalesce.max_batch == 8 and coalesce.max_wait == 0


def test_an_idle_worker_ends_and_lets_its_model_go(monkeypatch):
    monkeypatch.setattr(module, "IDLE_SECONDS", 0.05)
    model = Recorder(seconds=0)
    coalescer = Coalescer(model)
    assert (coalescer(np.arange(3)) == np.arange(3) * 2).all()
    worker = coalescer._worker
    worker.join(timeout=5)
    assert not worker.is_alive()  # idle: the thread ended
    assert (coalescer(np.arange(2)) == np.arange(2) * 2).all()  # the next call starts one
    coalescer._worker.join(timeout=5)
    gone = weakref.ref(model)
    del coalescer, model
    gc.collect()
    assert gone() is None  # nothing keeps a loaded model alive once it is idle


def test_calls_racing_an_ending_worker_are_all_served(monkeypatch):
    monkeypatch.setattr(module, "IDLE_SECONDS", 0.001)  # workers end between most calls
    coalescer = Coalescer(Recorder(seconds=0))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: coalescer(np.array([i]))[0], range(400)))
    assert results == [2 * i for i in range(400)]


@pytest.mark.timeout(30)
def test_a_pass_that_never_returns_fails_its_callers_in_time_and_calls_go_on():
    """A wedged forward pass: its callers get BatchTimeout within the bound (HTTP 503 when
    served) instead of waiting for ever."""
    release = threading.Event()

    def wedged(rows, key):
        if key == "wedged":
            release.wait(20)
        return rows * 2

    coalesce = Coalescer(wedged, max_batch=8, max_wait=0.0, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(module.BatchTimeout, match="no answer in 0.5 s"):
        coalesce(np.ones((2, 1)), key="wedged")
    assert time.monotonic() - started < 5
    release.set()  # the pass ends; the worker takes the next call
    np.testing.assert_array_equal(coalesce(np.ones((1, 1))), [[2.0]])


@pytest.mark.timeout(30)
def test_a_failure_while_gathering_fails_those_callers_and_the_worker_carries_on():
    class NoLength:  # rows the worker cannot size: _gather raises on them
        def __len__(self):
            raise RuntimeError("rows without a length")

    coalesce = Coalescer(Recorder(seconds=0.0), max_batch=8, max_wait=0.0, timeout=10)
    with ThreadPoolExecutor(2) as pool:
        broken = pool.submit(coalesce, NoLength())
        with pytest.raises(RuntimeError, match="rows without a length"):
            broken.result(timeout=10)
    np.testing.assert_array_equal(coalesce(np.arange(3)[:, None]), [[0], [2], [4]])
