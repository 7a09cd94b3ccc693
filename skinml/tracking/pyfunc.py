"""The served model: base64 JPEG/PNG in (with age, sex and body site for a model that
fuses them), diagnosis and class probabilities out.

MLflow builds it from code at load time (`pyfunc_entry.py`), so no pickled object is ever
loaded; the weights and their metadata (architecture, classes, preprocessing) travel in
one plain checkpoint opened with `weights_only=True`. `logged_model.py` logs and loads it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from skinml.core.config import ModelConfig
from skinml.core.errors import SkinmlError
from skinml.core.labels import CLASSES, DIAGNOSES, PROBABILITY_COLUMNS
from skinml.data.clinical import ClinicalValueError, encode_clinical
from skinml.data.decode import decode_to_frame
from skinml.data.jpeg_batch import CorruptRowError, decode_batch
from skinml.data.preprocess import Preprocess
from skinml.models import build_model, run_network
from skinml.tracking.coalescer import BatchTimeout, Coalescer

MAX_PIXELS = 50_000_000  # 7000x7000; real dermoscopy images are far smaller
# Images per forward pass: any number of rows runs in chunks, so memory holds the input,
# the output and at most two chunks of pixels (one decoding while the other runs).
CHUNK = 64
# Limits on one request reaching a server, checked before any image is decoded (a client
# cannot make the server decode 100,000 images or hold gigabytes of pixels for one call).
MAX_ROWS_ENV, MAX_ROWS = "SKINML_SERVE_MAX_ROWS", 256
MAX_REQUEST_MB_ENV, MAX_REQUEST_MB = "SKINML_SERVE_MAX_REQUEST_MB", 64
# MLflow's scoring server (`mlflow models serve`, hence `skinml serve`) sets this in every
# worker process before it loads the model: mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH,
# unchanged since MLflow 1.x (tests/tracking/test_pyfunc.py pins it). In-process predict,
# `mlflow models predict` and `spark_udf` (env_manager="local") run without it.
SCORING_SERVER_ENV = "__pyfunc_model_path__"
DECODE_WORKERS_ENV = "SKINML_DECODE_WORKERS"
# On CUDA, SKINML_GPU_DECODE=1 decodes JPEGs batched on the GPU (nvjpeg): far faster, its
# pixels within a few uint8 levels of training's (tests/data/test_jpeg_batch.py), so it is
# opted into, not the default.
GPU_DECODE_ENV = "SKINML_GPU_DECODE"


class SkinLesionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame column `image` (base64 JPEG/PNG) -> label, diagnosis, confidence, p_*.

    A fusion model also reads the optional columns `age`, `sex` and `localization`; a
    missing column or value is "not recorded" (`data.clinical`).
    """

    def load_context(self, context) -> None:
        payload = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        meta = payload["meta"]
        if tuple(meta["classes"]) != CLASSES:
            raise MlflowException(f"model classes {meta['classes']} differ from {CLASSES}")
        self.preprocess = Preprocess.from_meta(meta)
        self.arch = meta["arch"]
        self.metadata = meta.get("metadata", "none")  # models from before fusion: none
        config = ModelConfig(arch=meta["arch"], pretrained=False,
                             image_size=self.preprocess.image_size,
                             crop_pct=self.preprocess.crop_pct, drop_rate=meta["drop_rate"],
                             metadata=self.metadata)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A single model, or a fold ensemble: the mean of each member's own calibrated
        # probabilities (each fold was calibrated on its own validation fold).
        members = payload.get("members") or [{"weights": payload["weights"],
                                              "temperature": meta.get("temperature", 1.0)}]
        self.networks = []
        for member in members:
            network = build_model(config)
            network.load_state_dict(member["weights"])
            self.networks.append(network.to(self.device).eval())
        self.temperatures = [float(member["temperature"]) for member in members]
        self.network = self.networks[0]  # what Grad-CAM explains (an ensemble's first fold)
        # One temperature for one network; an ensemble has none that applies to its mean.
        self.temperature = self.temperatures[0] if len(members) == 1 else math.nan
        self.transform = self.preprocess.eval_transform().to(self.device)
        self.limits = RequestLimits.for_this_process()
        self.decoder = ParallelDecoder(self.preprocess.frame, device=self.device)
        # Concurrent requests (the scoring server's threads) share forward passes.
        self.coalesce = Coalescer.from_environment(self._forward, concat=_concat)

    def to(self, device: str | torch.device) -> SkinLesionModel:
        """Run on `device` from now on (loading picks CUDA when there is one)."""
        self.device = torch.device(device)
        for network in self.networks:
            network.to(self.device)
        self.transform = self.transform.to(self.device)
        self.decoder.use(self.device)
        return self

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        images = _image_column(model_input)
        self.limits.check(images)
        clinical = self.clinical(model_input)
        params = params or {}
        key = (bool(params.get("tta", False)), bool(params.get("calibrated", True)))
        try:
            probs = [self.coalesce(_Rows(pixels, _rows(clinical, start, len(pixels))), key)
                     for start, pixels in zip(range(0, len(images), CHUNK),
                                              self.decoder.chunks(images, CHUNK), strict=True)]
        except BatchTimeout as exc:  # HTTP 503: the server answers, this model did not
            raise MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE) from None
        return probability_table(np.concatenate(probs))

    def clinical(self, model_input: pd.DataFrame) -> np.ndarray | None:
        """The rows' clinical vectors for a fusion model (None for an image-only model); a
        bad value is a BadInput naming its row and column."""
        if self.metadata == "none":
            return None
        try:
            return encode_clinical(model_input)
        except ClinicalValueError as exc:
            raise _bad_row(exc.row, exc.reason) from None

    def inputs(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Network input from uint8 (B, H, W, 3) images already fitted to the frame (a
        tensor when they were decoded on the GPU)."""
        pixels = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        return self.transform(pixels.to(self.device))

    def probabilities(self, inputs: torch.Tensor, calibrated: bool = True,
                      clinical: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(logits / T): the served probabilities (T = 1 when not `calibrated`);
        for an ensemble the mean over its members, each with its own T. A fusion model
        without `clinical` sees every value missing."""
        return torch.stack([
            (run_network(network, inputs, clinical).float()
             / (temperature if calibrated else 1.0)).softmax(1)
            for network, temperature in zip(self.networks, self.temperatures, strict=True)
        ]).mean(0)

    @torch.no_grad()
    def _forward(self, rows: _Rows, key: tuple[bool, bool]) -> np.ndarray:
        tta, calibrated = key
        inputs = self.inputs(rows.pixels)
        clinical = None if rows.clinical is None else torch.from_numpy(rows.clinical).to(
            self.device)
        views = _dihedral(inputs) if tta else [inputs]  # the metadata is the same in each view
        probs = torch.stack([self.probabilities(view, calibrated, clinical)
                             for view in views]).mean(0)
        return probs.cpu().numpy().astype(np.float64)

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
            raise _bad_row(row, str(exc)) from None

    @staticmethod
    def _raw(value: Any, row: int) -> bytes:
        if not isinstance(value, str | bytes) or not value:
            raise _bad_row(row, "image must be a non-empty base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_row(row, "image is not valid base64") from None

    def _on_gpu(self, values: list[Any], offset: int) -> torch.Tensor:
        raws = [self._raw(value, offset + i) for i, value in enumerate(values)]
        try:
            return decode_batch(raws, *self.frame, self.gpu, max_pixels=MAX_PIXELS).pixels
        except CorruptRowError as exc:
            raise _bad_row(offset + exc.row, str(exc)) from None

    def _submit(self, values: list[Any], offset: int) -> _Pending:
        if self.gpu is not None:
            return _Pending([self._executor().submit(self._on_gpu, values, offset)], whole=True)
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


@dataclass(frozen=True)
class _Rows:
    """One call's chunk on its way through the coalescer: pixels and, for a fusion model,
    their clinical vectors."""

    pixels: np.ndarray | torch.Tensor
    clinical: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pixels)


def _rows(clinical: np.ndarray | None, start: int, count: int) -> np.ndarray | None:
    return None if clinical is None else clinical[start:start + count]


def _concat(parts: list[_Rows]) -> _Rows:
    """Coalesced requests' rows: pixels as numpy from the CPU decode, tensors from the GPU's."""
    chunks = [part.pixels for part in parts]
    tensors = [chunk for chunk in chunks if isinstance(chunk, torch.Tensor)]
    pixels = np.concatenate(chunks) if not tensors else torch.cat(
        [torch.as_tensor(chunk, device=tensors[0].device) for chunk in chunks])
    clinical = [part.clinical for part in parts]
    return _Rows(pixels, None if clinical[0] is None else np.concatenate(clinical))


def decode_workers() -> int:
    """SKINML_DECODE_WORKERS, else one thread per core (at most 8)."""
    value = os.environ.get(DECODE_WORKERS_ENV, "")
    return max(1, int(value)) if value.strip() else min(8, os.cpu_count() or 1)


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
            raise _bad_input(f"request has {len(images)} images; at most {self.max_rows} per "
                             f"request ({MAX_ROWS_ENV})")
        if self.max_mb is None:
            return
        # float: the sum of an empty string column would be "" (pandas' str dtype)
        size = images.map(lambda value: len(value) if isinstance(value, str | bytes) else 0,
                          na_action="ignore").astype("float64").sum()
        if size > self.max_mb * 1e6:
            raise _bad_input(f"request holds {size / 1e6:.1f} MB of images; at most "
                             f"{self.max_mb:g} MB per request ({MAX_REQUEST_MB_ENV})")


def probability_table(probs: np.ndarray) -> pd.DataFrame:
    """The served output: label, diagnosis, confidence and p_<class> for each row."""
    best = probs.argmax(1)
    # Plain object columns, not pandas 3's Arrow strings: cheaper per request, and the
    # dtype MLServer's V2 codec knows how to send.
    return pd.DataFrame({
        "label": pd.Series([CLASSES[i] for i in best], dtype=object),
        "diagnosis": pd.Series([DIAGNOSES[CLASSES[i]] for i in best], dtype=object),
        "confidence": probs[np.arange(len(probs)), best],
        **{column: probs[:, i] for i, column in enumerate(PROBABILITY_COLUMNS)},
    })


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a square batch (dermoscopy has no canonical orientation)."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [r.flip(3) for r in rotations]


def _image_column(model_input: Any) -> pd.Series:
    # list(): a membership test on the Index builds a hash table on every request.
    if not isinstance(model_input, pd.DataFrame) or "image" not in list(model_input.columns):
        raise _bad_input("input must have a column named 'image' holding base64 JPEG/PNG bytes")
    if len(model_input) == 0:
        raise _bad_input("input has no rows: send at least one image")
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


def _bad_input(message: str) -> BadInput:
    error = BadInput(message, error_code=INVALID_PARAMETER_VALUE)
    error.reason = message
    return error


def _bad_row(row: int, reason: str) -> BadInput:
    error = _bad_input(f"row {row}: {reason}")
    error.row, error.reason = row, reason
    return error


