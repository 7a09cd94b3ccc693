"""RequestBatcher: concurrent requests merged into one call, each answered with its own rows,
a bad row failing only its own request (a plain function stands in for the model)."""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest

from skinml.serving.request_batches import RequestBatcher, merge_key, split_rows


class RowError(ValueError):
    """As the served model's BadInput: names the first bad row of the call."""

    def __init__(self, row: int) -> None:
        super().__init__(f"row {row}: bad value")
        self.row = row


class Model:
    """Doubles `x`; a negative value is a bad row; records the rows of every call."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.calls: list[int] = []
        self.seconds = seconds

    def __call__(self, frame: pd.DataFrame, params: dict | None) -> pd.DataFrame:
        self.calls.append(len(frame))
        time.sleep(self.seconds)
        bad = [i for i, x in enumerate(frame["x"]) if x < 0]
        if bad:
            raise RowError(bad[0])
        factor = 3 if (params or {}).get("triple") else 2
        return pd.DataFrame({"y": frame["x"] * factor})


def frame(*values: int) -> pd.DataFrame:
    return pd.DataFrame({"x": list(values)})


async def ask(batcher: RequestBatcher, frames: list[pd.DataFrame],
              params: list[dict | None] | None = None) -> list:
    """All requests at once, as concurrent clients; each answer or its exception."""
    params = params or [None] * len(frames)
    return await asyncio.gather(*(batcher(f, p) for f, p in zip(frames, params, strict=True)),
                                return_exceptions=True)


def test_concurrent_requests_merge_and_each_gets_its_own_rows():
    model = Model()
    answers = asyncio.run(ask(RequestBatcher(model, max_rows=16),
                              [frame(i, 100 + i) for i in range(6)]))
    assert model.calls == [12]  # one call for six requests of two rows
    for i, answer in enumerate(answers):
        assert answer["y"].tolist() == [2 * i, 2 * (100 + i)]


def test_batches_hold_at_most_max_rows_but_a_larger_request_runs_whole():
    model = Model()
    answers = asyncio.run(ask(RequestBatcher(model, max_rows=4),
                              [frame(1), frame(2), frame(3), frame(4), frame(5), frame(*range(9))]))
    assert model.calls == [4, 1, 9]
    assert answers[4]["y"].tolist() == [10] and len(answers[5]) == 9


def test_a_bad_row_fails_only_its_own_request_with_its_own_row_number():
    model = Model()
    answers = asyncio.run(ask(RequestBatcher(model), [frame(1), frame(2, 3, -1), frame(4)]))
    assert answers[0]["y"].tolist() == [2] and answers[2]["y"].tolist() == [8]
    assert isinstance(answers[1], RowError) and answers[1].row == 2  # not the merged row 3
    assert model.calls == [5, 3, 2]  # merged; the culprit alone; the others merged again


def test_an_error_without_a_row_has_each_request_answered_alone():
    def model(frame: pd.DataFrame, params: dict | None) -> pd.DataFrame:
        if len(frame) > 1:
            raise RuntimeError("only one row at a time")
        return frame

    answers = asyncio.run(ask(RequestBatcher(model), [frame(1), frame(2), frame(3)]))
    assert [answer["x"].tolist() for answer in answers] == [[1], [2], [3]]


def test_requests_with_other_parameters_or_columns_or_no_rows_are_not_merged():
    model = Model()
    frames = [frame(1), frame(2), pd.DataFrame({"x": [3], "age": [40]}), frame(4), frame()]
    params = [None, {"triple": True}, None, None, None]
    answers = asyncio.run(ask(RequestBatcher(model), frames, params))
    assert sorted(model.calls) == [0, 1, 1, 2]  # only the first and fourth merged
    assert [len(answer) for answer in answers] == [1, 1, 1, 1, 0]
    assert answers[1]["y"].tolist() == [6] and answers[3]["y"].tolist() == [8]
    assert merge_key(frame(), None) is None and merge_key({"x": [1]}, None) is None


def test_requests_arriving_during_a_batch_form_the_next_one():
    async def clients(batcher: RequestBatcher) -> None:
        first = asyncio.ensure_future(batcher(frame(0)))
        await asyncio.sleep(0.02)  # the first batch is running: these queue behind it
        later = [asyncio.ensure_future(batcher(frame(i))) for i in range(1, 9)]
        await asyncio.gather(first, *later)

    model = Model(seconds=0.1)
    asyncio.run(clients(RequestBatcher(model)))
    assert model.calls == [1, 8]


def test_a_batch_waits_for_as_many_requests_as_the_last_but_a_lone_one_never_waits():
    """Clients of a batch of four come back one by one: the next batch waits for all four
    (up to max_wait); after an idle spell a lone request runs at once."""
    async def clients(batcher: RequestBatcher) -> float:
        await asyncio.gather(*(batcher(frame(i)) for i in range(4)))

        async def later(i: int) -> None:
            await asyncio.sleep(0.02 * i)
            await batcher(frame(i))

        await asyncio.gather(*(later(i) for i in range(4)))
        await asyncio.sleep(0.3)  # idle
        started = time.monotonic()
        await batcher(frame(9))
        return time.monotonic() - started

    model = Model()
    lone = asyncio.run(clients(RequestBatcher(model, max_wait=1.0)))
    assert model.calls == [4, 4, 1]
    assert lone < 0.5  # it did not wait max_wait (1 s) for four


def test_split_rows_refuses_an_output_that_does_not_match_the_rows():
    assert [part.tolist() for part in split_rows(pd.Series([1, 2, 3]), [1, 2])] == [[1], [2, 3]]
    with pytest.raises(ValueError, match="one row per input row"):
        split_rows(pd.Series([1, 2]), [1, 2])
