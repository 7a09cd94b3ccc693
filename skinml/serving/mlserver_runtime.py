"""The MLServer runtime that serves a logged skinml model: `mlserver_mlflow.MLflowRuntime`
with MLflow's answers to bad requests, the server's request limits, and both endpoints
batched.

Why a runtime, not an ASGI middleware: the limits count a request's rows and image bytes,
which only exist once the body is parsed, and MLServer parses it into the request the
runtime receives; a middleware would parse every body a second time, and could not batch.
So each endpoint's handler here parses (V2: MLServer's codec; `/invocations`: MLflow's
own parser), judges the client's request against the limits, and hands it to one
`RequestBatcher` shared by both endpoints. MLServer's adaptive batching stays off
(`mlserver.py` writes no `max_batch_size`): it merges requests before any hook of the
runtime sees them, a bad row there fails every request merged with it, and it does not
batch `/invocations` at all.

Every refusal is one line: HTTP 400 (413 for the megabyte limit) with `{"error": reason}`,
the reason the model gives under `mlflow models serve` (MLflow's schema messages without
the request echoed back), and one log line; MLServer's debug mode, which puts tracebacks in
response bodies, is off (`mlserver.py`). Malformed V2 bodies are answered by
`mlserver_entry.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd
from fastapi import Request, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import (
    CONTENT_TYPE_CSV,
    CONTENT_TYPE_JSON,
    CONTENT_TYPES,
    _split_data_and_params,
    infer_and_parse_data,
    parse_csv_input,
)
from mlflow.utils.proto_json_utils import NumpyEncoder, _get_jsonable_obj
from mlserver.errors import MLServerError
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec

from skinml.core.errors import first_line
from skinml.serving.mlserver import LOAD_FAILURE
from skinml.serving.request_batches import RequestBatcher
from skinml.tracking.pyfunc import RequestLimits

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"  # the column the megabyte limit measures (as the model's limits do)
# MLflow's answer to a prediction that fails with anything but an MlflowException.
UNEXPECTED = ("Encountered an unexpected error while evaluating the model. Verify that the "
              "serialized input Dataframe is compatible with the model for inference.")
PARSE_IN_THREAD_BYTES = 1_000_000  # larger bodies are parsed off the event loop
MAX_REASON = 500  # characters of a reason; a longer one is cut (it may quote the request)


class SkinmlRuntime(MLflowRuntime):
    """MLflow's pyfunc under MLServer, on a par with `mlflow models serve` (module doc).

    Settings, from model-settings.json `parameters.extra`: `max_batch_rows`, `max_wait_ms`
    (the batching), `max_rows`, `max_request_mb` (the limits; null: none; absent: from
    SKINML_SERVE_MAX_ROWS and SKINML_SERVE_MAX_REQUEST_MB).
    """

    async def load(self) -> bool:
        try:
            await super().load()
        except Exception as exc:
            # The line `skinml serve --mlserver` reports (MLServer logs the traceback after).
            logger.error("%s%s", LOAD_FAILURE, first_line(exc))
            raise
        if self.settings.max_batch_size > 1 and self.settings.max_batch_time > 0:
            logger.warning("model-settings.json turns on MLServer's adaptive batching "
                           "(max_batch_size): it merges V2 requests before the limits judge "
                           "them; remove it, the runtime batches (parameters.extra)")
        extra = dict(getattr(self.settings.parameters, "extra", None) or {})
        limits = RequestLimits.from_environment()
        self.limits = RequestLimits(max_rows=extra.get("max_rows", limits.max_rows),
                                    max_mb=extra.get("max_request_mb", limits.max_mb))
        batching = {"max_rows": int(extra.get("max_batch_rows", 16)),
                    "max_wait": float(extra.get("max_wait_ms", 5)) / 1000}
        # One batcher per endpoint, as each encodes its answers its own way (a batch's
        # once); the model's coalescer still merges the forward passes of both.
        self.batchers = {"v2": RequestBatcher(self._call_model, self._v2_answers, **batching),
                         "invocations": RequestBatcher(self._call_model, invocation_answers,
                                                       **batching)}
        return True

    @custom_handler(rest_path="/ping", rest_method="GET")
    async def ping(self) -> Response:
        """200 once the model is loaded (MLflow's meaning), 503 while it loads: the route
        exists before the model does."""
        return Response("\n", status_code=200 if self.ready else 503)

    @custom_handler(rest_path="/health", rest_method="GET")
    async def health(self) -> Response:
        return await self.ping()

    @custom_handler(rest_path="/invocations")
    async def invocations(self, request: Request) -> Response:
        """MLflow's scoring protocol (JSON or CSV), batched with concurrent requests."""
        try:
            if not self.ready:
                raise Refused("the model is still loading (GET /ping answers 200 once it "
                              "is loaded)", status=503)
            body = await request.body()
            data, params = await self._parse_invocation(
                body, request.headers.get("content-type", ""))
            answer = await self._answer("invocations", data, params)
        except Exception as exc:  # noqa: BLE001  (every failure is one line)
            raise self._refused("/invocations", exc) from None
        return Response(content=answer, media_type="application/json")

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """The V2 inference protocol: one client's request, batched with concurrent ones."""
        try:
            try:
                data = self.decode_request(payload)
            except (ValueError, TypeError) as exc:  # MLServer's codecs on bad tensors
                raise Refused(f"cannot decode the request's inputs: {one_line(str(exc))}") \
                    from None
            params = None
            if payload.parameters and payload.parameters.model_extra:
                params = dict(payload.parameters.model_extra)
            return await self._answer("v2", data, params)
        except Exception as exc:  # noqa: BLE001  (every failure is one line)
            raise self._refused(f"/v2/models/{self.name}/infer", exc) from None

    async def _parse_invocation(self, body: bytes, content_type: str
                                ) -> tuple[Any, dict[str, Any] | None]:
        mime, *options = (part.strip() for part in content_type.split(";"))
        charset = dict(option.partition("=")[::2] for option in options).get("charset", "utf-8")
        if charset.lower() != "utf-8":
            raise Unsupported("The scoring server only supports UTF-8")
        if mime not in (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV):
            raise Unsupported("This predictor only supports the following content types: "
                              f"{CONTENT_TYPES}. Got '{content_type}'.")
        if len(body) > PARSE_IN_THREAD_BYTES:  # megabytes of JSON would stall every client
            return await asyncio.to_thread(self._parse_body, body, mime)
        return self._parse_body(body, mime)

    def _parse_body(self, body: bytes, mime: str) -> tuple[Any, dict[str, Any] | None]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("Ensure that input is a valid UTF-8 encoded string.") from None
        if mime == CONTENT_TYPE_CSV:
            return parse_csv_input(StringIO(text), schema=self._input_schema), None
        raw, params = _split_data_and_params(text)
        return infer_and_parse_data(raw, self._input_schema), params

    async def _answer(self, endpoint: str, data: Any, params: dict[str, Any] | None) -> Any:
        data = as_frame(data)
        self.judge(data)
        return await self.batchers[endpoint](data, params)

    def _call_model(self, data: Any, params: dict[str, Any] | None) -> Any:
        return self._model.predict(data, params=params)

    def _v2_answers(self, output: Any, sizes: list[int] | None) -> list[InferenceResponse]:
        """V2 responses: the batch's output encoded once, its outputs cut per request."""
        response = self.encode_response(output, default_codec=TensorDictCodec)
        return [response] if sizes is None else split_response(response, sizes)

    def judge(self, data: Any) -> None:
        """The row limit (400) and the megabyte limit (413) on one client's request."""
        images = image_values(data)
        if len(images) == 0:  # nothing to count (the model answers an empty request)
            return
        dataclasses.replace(self.limits, max_mb=None).check(images)
        try:
            dataclasses.replace(self.limits, max_rows=None).check(images)
        except MlflowException as exc:
            raise Refused(exc.message, status=413) from None

    def _refused(self, path: str, exc: BaseException) -> MLServerError:
        """The one-line answer to a failed request, logged once."""
        if isinstance(exc, MLServerError):
            error = exc
        elif isinstance(exc, MlflowException):
            error = MLServerError(one_line(exc.message), exc.get_http_status_code())
        else:  # MLflow's answer; the log line says what happened
            error = MLServerError(UNEXPECTED, 400)
            logger.warning("refused %s: 400 unexpected %s: %s", path, type(exc).__name__,
                           one_line(str(exc)))
            return error
        logger.warning("refused %s: %d %s", path, error.status_code, error)
        return error


class Refused(MLServerError):
    """A request refused with `status` and a one-line reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason, status)


class Unsupported(Refused):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, 415)


def invocation_answers(output: Any, sizes: list[int] | None) -> list[str]:
    """MLflow's `{"predictions": ...}` JSON for each request (its `predictions_to_json`,
    the output converted once)."""
    predictions = _get_jsonable_obj(output, pandas_orient="records")
    if sizes is not None:
        if not isinstance(predictions, list) or len(predictions) != sum(sizes):
            raise ValueError("the model's output does not have one row per input row")
        starts = np.cumsum([0, *sizes])
        parts = [predictions[start:end] for start, end in zip(starts, starts[1:], strict=False)]
    else:
        parts = [predictions]
    return [json.dumps({"predictions": part}, cls=NumpyEncoder) for part in parts]


def split_response(response: InferenceResponse, sizes: list[int]) -> list[InferenceResponse]:
    """A batch's V2 response cut into one per request (rows are each output's first
    dimension), as MLServer's adaptive batching splits its batches' responses."""
    answers = [[] for _ in sizes]
    for output in response.outputs:
        data = list(getattr(output.data, "root", output.data))
        if not output.shape or output.shape[0] != sum(sizes):
            raise ValueError("the model's output does not have one row per input row")
        per_row = math.prod(output.shape[1:])
        start = 0
        for outputs, size in zip(answers, sizes, strict=True):
            outputs.append(ResponseOutput(
                name=output.name, shape=[size, *output.shape[1:]], datatype=output.datatype,
                parameters=output.parameters, data=data[start:start + size * per_row]))
            start += size * per_row
    return [InferenceResponse(model_name=response.model_name,
                              model_version=response.model_version,
                              parameters=response.parameters, outputs=outputs)
            for outputs in answers]


def as_frame(data: Any) -> Any:
    """A parsed request as a DataFrame when it is columns of equal length (MLflow parses
    `inputs`/`instances` payloads into a dict of arrays), so it can be merged; else as is."""
    if isinstance(data, dict) and data:
        try:
            return pd.DataFrame({name: np.atleast_1d(value) for name, value in data.items()})
        except ValueError:  # columns of different lengths, or not columns at all
            return data
    return data


def image_values(data: Any) -> pd.Series:
    """The values the limits count: one per row, the image column's where there is one."""
    if isinstance(data, pd.DataFrame):
        if IMAGE_COLUMN in data.columns:
            return data[IMAGE_COLUMN]
        return pd.Series([None] * len(data), dtype=object)
    if isinstance(data, dict) and IMAGE_COLUMN in data:  # one value per row, of any shape
        return pd.Series(list(np.atleast_1d(data[IMAGE_COLUMN])), dtype=object)
    rows = max((len(np.atleast_1d(value)) for value in data.values()), default=0) \
        if isinstance(data, dict) else 1
    return pd.Series([None] * rows, dtype=object)


def one_line(message: str) -> str:
    """MLflow's message for a refused request as one line, without the request in it.

    MLflow's schema check says "Failed to enforce schema of data '<the data>' with schema
    '<schema>'. Error: <reason>": the reason is what the client needs.
    """
    if message.startswith("Failed to enforce schema") and "Error: " in message:
        message = message.rsplit("Error: ", 1)[1]
    lines = message.strip().splitlines()
    line = lines[0] if lines else "refused"
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 1] + "…"
