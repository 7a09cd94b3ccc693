"""Concurrent client requests merged into one model call, each answered with its own rows.

MLServer serves one request per `predict` unless its adaptive batching merges them, and that
batching has three faults for a model that refuses bad rows: a bad row fails every request
merged with it (with the merged batch's row number), a merged batch meets the row limit that
was meant for one client's request, and the parameters of the last request (TTA on or off)
apply to all. Here requests merge only with requests of the same columns and parameters;
a merged call that fails is answered again: the request owning the bad row alone (so its
answer is the one it would have got by itself), the others merged again.

While a batch runs, the requests that arrive wait and are merged into the next, up to
`max_rows` rows. A batch waits at most `max_wait` seconds for as many requests as the one
before it held (the clients of the last batch come back one by one as their answers reach
them; without the wait the first to return would run alone while the others queue behind
it); a request to a server that was idle runs at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)
IDLE_SECONDS = 0.1  # a server idle this long expects lone requests again
Predict = Callable[[Any, "dict[str, Any] | None"], Any]
# (output of one call, the rows of each request in it, or None for a single request) -> each
# request's answer: the output cut into its rows, and whatever encoding its endpoint sends.
Split = Callable[[Any, "list[int] | None"], list]


@dataclass
class _Request:
    data: Any  # a DataFrame (merged with others of the same key), or anything (runs alone)
    params: dict[str, Any] | None
    key: Hashable | None  # None: never merged
    future: asyncio.Future

    @property
    def rows(self) -> int:
        return len(self.data) if isinstance(self.data, pd.DataFrame) else 1


class RequestBatcher:
    """`await batcher(frame, params)` -> the model's output for `frame` alone.

    `predict(data, params)` runs on a worker thread (the event loop goes on reading
    requests meanwhile), one batch at a time: the requests that arrive during a batch form
    the next one. `split` cuts a call's output into the requests' answers on that thread
    too (encoding a batch's output once is cheaper than once per request).
    """

    def __init__(self, predict: Predict, split: Split | None = None, max_rows: int = 16,
                 max_wait: float = 0.005) -> None:
        self.predict, self.split = predict, split or split_rows
        self.max_rows, self.max_wait = max(1, max_rows), max_wait
        self._waiting: deque[_Request] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that serves
        self._arrived: asyncio.Event | None = None
        self._drainer: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="skinml-batch")
        self._expected = 1  # requests in the last batch: how many to wait for
        self._idle_since = 0.0  # when the last batch was answered

    async def __call__(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        request = _Request(data, params, merge_key(data, params), loop.create_future())
        if self._loop is not loop:  # an asyncio.Event belongs to one loop
            self._loop, self._arrived = loop, asyncio.Event()
        self._waiting.append(request)
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await request.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = await self._gather()
            logger.debug("batch of %d request(s), %d row(s)", len(batch),
                         sum(request.rows for request in batch))
            try:
                outcomes = await loop.run_in_executor(self._executor, self.answer, batch)
            except Exception as exc:  # noqa: BLE001  (a bug here must not leave clients hanging)
                outcomes = [exc] * len(batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.future.done():  # the client went away
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)
            self._idle_since = time.monotonic()

    async def _gather(self) -> list[_Request]:
        """The first waiting request and those that may join it, waiting up to `max_wait`
        for as many as the last batch held (none after an idle spell)."""
        batch = self._take([self._waiting.popleft()])
        if time.monotonic() - self._idle_since > IDLE_SECONDS:
            self._expected = 1
        deadline = time.monotonic() + self.max_wait
        while (len(batch) < self._expected and batch[0].key is not None
               and sum(request.rows for request in batch) < self.max_rows):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            batch = self._take(batch)
        self._expected = len(batch)
        return batch

    def _take(self, batch: list[_Request]) -> list[_Request]:
        """`batch` plus the waiting requests of its key, in order, up to `max_rows` rows
        (requests of other keys keep their places)."""
        key = batch[0].key
        if key is None:
            return batch
        rows = sum(request.rows for request in batch)
        kept: deque[_Request] = deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.key == key and rows + request.rows <= self.max_rows:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._waiting.extendleft(reversed(kept))
        return batch

    def answer(self, batch: list[_Request]) -> list[Any]:
        """Each request's output, or the exception that is its answer (on a worker thread).

        A merged call that fails is not every request's failure: the request that owns the
        row the error names is answered alone and the rest merged again; an error that names
        no row (or an output that does not match the rows) has each request answered alone.
        """
        outcomes: dict[int, Any] = {}
        pending = list(batch)
        while pending:
            if len(pending) == 1:
                outcomes[id(pending[0])] = self._alone(pending[0])
                break
            try:
                output = self.predict(pd.concat([r.data for r in pending], ignore_index=True),
                                      pending[0].params)
                parts = self.split(output, [request.rows for request in pending])
            except Exception as exc:  # noqa: BLE001  (each request gets its own answer)
                culprit = _owner(pending, getattr(exc, "row", None))
                if culprit is None:
                    outcomes.update((id(r), self._alone(r)) for r in pending)
                    break
                outcomes[id(culprit)] = self._alone(culprit)
                pending = [request for request in pending if request is not culprit]
                continue
            outcomes.update((id(r), part) for r, part in zip(pending, parts, strict=True))
            break
        return [outcomes[id(request)] for request in batch]

    def _alone(self, request: _Request) -> Any:
        try:
            return self.split(self.predict(request.data, request.params), None)[0]
        except Exception as exc:  # noqa: BLE001  (the request's answer)
            return exc


def merge_key(data: Any, params: dict[str, Any] | None) -> Hashable | None:
    """What requests must share to be merged: their columns (with dtypes) and parameters.
    None (never merged) for data that is not a DataFrame, or has no rows (the model's own
    answer to an empty request must reach its client)."""
    if not isinstance(data, pd.DataFrame) or len(data) == 0:
        return None
    columns = tuple((str(name), str(dtype)) for name, dtype in data.dtypes.items())
    return columns, json.dumps(params, sort_keys=True, default=str)


def split_rows(output: Any, sizes: list[int] | None) -> list[Any]:
    """A merged call's output cut back into each request's rows (ValueError if the output
    does not have one row per input row); a single request's output whole."""
    if sizes is None:
        return [output]
    if not hasattr(output, "__len__") or len(output) != sum(sizes):
        raise ValueError("the model's output does not have one row per input row")
    parts, start = [], 0
    for size in sizes:
        if isinstance(output, pd.DataFrame | pd.Series):
            parts.append(output.iloc[start:start + size].reset_index(drop=True))
        else:
            parts.append(output[start:start + size])
        start += size
    return parts


def _owner(batch: list[_Request], row: Any) -> _Request | None:
    """The request holding merged row `row` (None when `row` names no row)."""
    if not isinstance(row, int) or row < 0:
        return None
    for request in batch:
        if row < request.rows:
            return request
        row -= request.rows
    return None
