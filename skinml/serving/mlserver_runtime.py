"""The MLServer runtime that serves a logged skinml model: `mlserver_mlflow.MLflowRuntime`
with MLflow's answers to bad requests, the server's request limits, and both endpoints
batched by the model itself.

Why a runtime, not an ASGI middleware: the limits count a request's rows and image bytes,
which only exist once the body is parsed, and MLServer parses it into the request the
runtime receives; a middleware would parse every body a second time. So each endpoint's
handler here parses (V2: MLServer's codec; `/invocations`: MLflow's own parser), judges the
client's request against the limits, and calls the model's `predict` on a thread of its
own, as `mlflow models serve` does: the model's coalescer (`inference/coalescer.py`)
merges the forward passes of concurrent requests, the one batching path of every server.
MLServer's adaptive batching stays off (`mlserver.py` writes no `max_batch_size`): it
merges requests before any hook of the runtime sees them, a bad row there fails every
request merged with it, and it does not batch `/invocations` at all.

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
from concurrent.futures import ThreadPoolExecutor
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
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec

from skinml.core.errors import first_line
from skinml.inference.requests import RequestLimits
from skinml.serving.mlserver import LOAD_FAILURE
from skinml.serving.mlserver_internals import input_schema, loaded_pyfunc

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"  # the column the megabyte limit measures (as the model's limits do)
# MLflow's answer to a prediction that fails with anything but an MlflowException.
UNEXPECTED = ("Encountered an unexpected error while evaluating the model. Verify that the "
              "serialized input Dataframe is compatible with the model for inference.")
PARSE_IN_THREAD_BYTES = 1_000_000  # larger bodies are parsed off the event loop
MAX_REASON = 500  # characters of a reason; a longer one is cut (it may quote the request)


class SkinmlRuntime(MLflowRuntime):
    """MLflow's pyfunc under MLServer, on a par with `mlflow models serve` (module doc).

    Settings, from model-settings.json `parameters.extra`: `max_rows`, `max_request_mb`
    (the limits; null: none; absent: from SKINML_SERVE_MAX_ROWS and
    SKINML_SERVE_MAX_REQUEST_MB), `max_concurrent` (requests in `predict` at once, 32).
    The model's batching reads SKINML_SERVE_MAX_BATCH and SKINML_SERVE_MAX_WAIT_MS.
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
        # Each request's predict on a thread of its own (the event loop goes on reading
        # requests); the model's coalescer merges the forward passes of the threads.
        self.calls = ThreadPoolExecutor(int(extra.get("max_concurrent", 32)),
                                        thread_name_prefix="skinml-request")
        return True

    async def unload(self) -> bool:
        self.calls.shutdown(wait=False, cancel_futures=True)
        return await super().unload()

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
            return parse_csv_input(StringIO(text), schema=input_schema(self)), None
        raw, params = _split_data_and_params(text)
        return infer_and_parse_data(raw, input_schema(self)), params

    async def _answer(self, endpoint: str, data: Any, params: dict[str, Any] | None) -> Any:
        data = as_frame(data)
        self.judge(data)
        encode = self._v2_answer if endpoint == "v2" else invocation_answer
        return await asyncio.get_running_loop().run_in_executor(
            self.calls, lambda: encode(loaded_pyfunc(self).predict(data, params=params)))

    def _v2_answer(self, output: Any) -> InferenceResponse:
        return self.encode_response(output, default_codec=TensorDictCodec)

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


def invocation_answer(output: Any) -> str:
    """MLflow's `{"predictions": ...}` JSON (its `predictions_to_json`)."""
    predictions = _get_jsonable_obj(output, pandas_orient="records")
    return json.dumps({"predictions": predictions}, cls=NumpyEncoder)


def as_frame(data: Any) -> Any:
    """A parsed request as a DataFrame when it is columns of equal length (MLflow parses
    `inputs`/`instances` payloads into a dict of arrays), so its rows can be counted and the
    model reads its columns by name; else as is."""
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
