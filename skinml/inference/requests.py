"""What a request to the served model may be: its image column (base64 JPEG/PNG), the
limits one request must stay within behind a server, and the one-line 400 for anything
else. One base64 codec for every path: `encode_image` writes what `decode_base64` reads.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Limits on one request reaching a server, checked before any image is decoded (a client
# cannot make the server decode 100,000 images or hold gigabytes of pixels for one call).
MAX_ROWS_ENV, MAX_ROWS = "SKINML_SERVE_MAX_ROWS", 256
MAX_REQUEST_MB_ENV, MAX_REQUEST_MB = "SKINML_SERVE_MAX_REQUEST_MB", 64
# MLflow's scoring server (`mlflow models serve`, hence `skinml serve`) sets this in every
# worker process before it loads the model: mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH,
# unchanged since MLflow 1.x (tests/inference/test_pyfunc.py pins it). In-process predict,
# `mlflow models predict` and `spark_udf` (env_manager="local") run without it.
SCORING_SERVER_ENV = "__pyfunc_model_path__"


def encode_image(image_bytes: bytes) -> str:
    """An image file's bytes as the `image` column carries them."""
    return base64.b64encode(image_bytes).decode("ascii")


def decode_base64(value: Any, row: int) -> bytes:
    """One `image` value's bytes; BadInput naming `row` when it is no base64 string."""
    if not isinstance(value, str | bytes) or not value:
        raise bad_row(row, "image must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_row(row, "image is not valid base64") from None


def behind_scoring_server() -> bool:
    """True in a worker of MLflow's scoring server, where requests come from clients."""
    return bool(os.environ.get(SCORING_SERVER_ENV))


@dataclass(frozen=True)
class RequestLimits:
    """The most images, and base64 megabytes, one `predict` call accepts (None: no limit)."""

    max_rows: int | None = MAX_ROWS
    max_mb: float | None = MAX_REQUEST_MB

    @classmethod
    def for_this_process(cls) -> RequestLimits:
        """The server limits behind MLflow's scoring server; none in a user's own process
        (in-process predict, `mlflow models predict`, `spark_udf`), where rows run in
        chunks and a limit would protect nobody."""
        return cls.from_environment() if behind_scoring_server() else cls(None, None)

    @classmethod
    def from_environment(cls) -> RequestLimits:
        """SKINML_SERVE_MAX_ROWS (256) and SKINML_SERVE_MAX_REQUEST_MB (64); 0: no limit."""
        rows = int(os.environ.get(MAX_ROWS_ENV, MAX_ROWS))
        mb = float(os.environ.get(MAX_REQUEST_MB_ENV, MAX_REQUEST_MB))
        return cls(max_rows=rows if rows > 0 else None, max_mb=mb if mb > 0 else None)

    def check(self, images: pd.Series) -> None:
        if self.max_rows is not None and len(images) > self.max_rows:
            raise bad_input(f"request has {len(images)} images; at most {self.max_rows} per "
                             f"request ({MAX_ROWS_ENV})")
        if self.max_mb is None:
            return
        # float: the sum of an empty string column would be "" (pandas' str dtype)
        size = images.map(lambda value: len(value) if isinstance(value, str | bytes) else 0,
                          na_action="ignore").astype("float64").sum()
        if size > self.max_mb * 1e6:
            raise bad_input(f"request holds {size / 1e6:.1f} MB of images; at most "
                             f"{self.max_mb:g} MB per request ({MAX_REQUEST_MB_ENV})")


def image_column(model_input: Any) -> pd.Series:
    # list(): a membership test on the Index builds a hash table on every request.
    if not isinstance(model_input, pd.DataFrame) or "image" not in list(model_input.columns):
        raise bad_input("input must have a column named 'image' holding base64 JPEG/PNG bytes")
    if len(model_input) == 0:
        raise bad_input("input has no rows: send at least one image")
    return model_input["image"]


class BadInput(MlflowException):
    """A request the model cannot answer: HTTP 400 whose message is our one-line reason.

    MLflow's scoring server rewrites a failed prediction's message to "Failed to predict
    data '<the whole request>'. Error: ...", echoing kilobytes of base64 to the client and
    the log. The message here is set once and stays as written.
    """

    row: int | None = None  # the first bad row of the call, when one row is to blame
    reason: str = ""  # the message without its "row N: "

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):
            self._reason = value


def bad_input(message: str) -> BadInput:
    error = BadInput(message, error_code=INVALID_PARAMETER_VALUE)
    error.reason = message
    return error


def bad_row(row: int, reason: str) -> BadInput:
    error = bad_input(f"row {row}: {reason}")
    error.row, error.reason = row, reason
    return error


