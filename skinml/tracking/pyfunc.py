"""The served model: base64 JPEG/PNG in, diagnosis and class probabilities out.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from skinml.core.config import ModelConfig
from skinml.core.errors import SkinmlError
from skinml.core.labels import CLASSES, DIAGNOSES, PROBABILITY_COLUMNS
from skinml.data.decode import fit_to_frame, open_rgb
from skinml.data.preprocess import Preprocess
from skinml.models import build_model
from skinml.tracking.coalescer import Coalescer

MAX_PIXELS = 50_000_000  # 7000x7000; real dermoscopy images are far smaller
CHUNK = 64  # images per forward pass: a 10,000-row request does not exhaust memory
_FILE_CHUNK = 256  # image files read and encoded per predict call (predict_paths)
# Limits on one request, checked before any image is decoded (a client cannot make the
# server decode 100,000 images or hold gigabytes of pixels for one call).
MAX_ROWS_ENV, MAX_ROWS = "SKINML_SERVE_MAX_ROWS", 256
MAX_REQUEST_MB_ENV, MAX_REQUEST_MB = "SKINML_SERVE_MAX_REQUEST_MB", 64
class SkinLesionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame column `image` (base64 JPEG/PNG) -> label, diagnosis, confidence, p_*."""

    def load_context(self, context) -> None:
        payload = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        meta = payload["meta"]
        if tuple(meta["classes"]) != CLASSES:
            raise MlflowException(f"model classes {meta['classes']} differ from {CLASSES}")
        self.preprocess = Preprocess.from_meta(meta)
        self.arch = meta["arch"]
        config = ModelConfig(arch=meta["arch"], pretrained=False,
                             image_size=self.preprocess.image_size,
                             crop_pct=self.preprocess.crop_pct, drop_rate=meta["drop_rate"])
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
        self.limits = RequestLimits.from_environment()
        # Concurrent requests (the scoring server's threads) share forward passes.
        self.coalesce = Coalescer.from_environment(self._forward)

    def to(self, device: str | torch.device) -> SkinLesionModel:
        """Run on `device` from now on (loading picks CUDA when there is one)."""
        self.device = torch.device(device)
        for network in self.networks:
            network.to(self.device)
        self.transform = self.transform.to(self.device)
        return self

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        images = _image_column(model_input)
        self.limits.check(images)
        params = params or {}
        tta, calibrated = bool(params.get("tta", False)), bool(params.get("calibrated", True))
        probs = np.concatenate([self._batch_probabilities(images[i:i + CHUNK], i, tta, calibrated)
                                for i in range(0, len(images), CHUNK)])
        return probability_table(probs)

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """Network input from uint8 (B, H, W, 3) images already fitted to the frame."""
        return self.transform(torch.from_numpy(pixels).to(self.device))

    def probabilities(self, inputs: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """softmax(logits / T): the served probabilities (T = 1 when not `calibrated`);
        for an ensemble the mean over its members, each with its own T."""
        return torch.stack([
            (network(inputs).float() / (temperature if calibrated else 1.0)).softmax(1)
            for network, temperature in zip(self.networks, self.temperatures, strict=True)
        ]).mean(0)

    def _batch_probabilities(self, encoded: list[Any], offset: int, tta: bool,
                             calibrated: bool) -> np.ndarray:
        """Decoded here, in the caller's thread (a bad image fails only its own request);
        the forward pass is shared with whatever other requests are queued."""
        pixels = np.stack([self._decode(value, offset + i) for i, value in enumerate(encoded)])
        return self.coalesce(pixels, (tta, calibrated))

    @torch.no_grad()
    def _forward(self, pixels: np.ndarray, key: tuple[bool, bool]) -> np.ndarray:
        tta, calibrated = key
        inputs = self.inputs(pixels)
        views = _dihedral(inputs) if tta else [inputs]
        probs = torch.stack([self.probabilities(view, calibrated) for view in views]).mean(0)
        return probs.cpu().numpy().astype(np.float64)

    def _decode(self, value: Any, row: int) -> np.ndarray:
        if not isinstance(value, str | bytes) or not value:
            raise _bad_input(f"row {row}: image must be a non-empty base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: image is not valid base64") from None
        height, width = self.preprocess.frame
        try:
            # Decoded exactly as the training cache decoded it (same JPEG draft scale).
            image = open_rgb(io.BytesIO(raw), draft_to=(2 * width, 2 * height),
                             max_pixels=MAX_PIXELS)
        except SkinmlError as exc:
            raise _bad_input(f"row {row}: {exc}") from None
        return np.asarray(fit_to_frame(image, height, width))


@dataclass(frozen=True)
class RequestLimits:
    """The most images, and base64 megabytes, one `predict` call accepts."""

    max_rows: int = MAX_ROWS
    max_mb: float = MAX_REQUEST_MB

    @classmethod
    def from_environment(cls) -> RequestLimits:
        """SKINML_SERVE_MAX_ROWS (256) and SKINML_SERVE_MAX_REQUEST_MB (64); 0: no limit."""
        rows = int(os.environ.get(MAX_ROWS_ENV, MAX_ROWS))
        mb = float(os.environ.get(MAX_REQUEST_MB_ENV, MAX_REQUEST_MB))
        return cls(max_rows=rows if rows > 0 else 10**12, max_mb=mb if mb > 0 else math.inf)

    def check(self, images: list[Any]) -> None:
        if len(images) > self.max_rows:
            raise _bad_input(f"request has {len(images)} images; at most {self.max_rows} per "
                             f"request ({MAX_ROWS_ENV})")
        size = sum(len(value) for value in images if isinstance(value, str | bytes))
        if size > self.max_mb * 1e6:
            raise _bad_input(f"request holds {size / 1e6:.1f} MB of images; at most "
                             f"{self.max_mb:g} MB per request ({MAX_REQUEST_MB_ENV})")

    def chunks(self, paths: list[Path]) -> list[list[Path]]:
        """`paths` cut into calls that stay within the limits (and `_FILE_CHUNK` files)."""
        chunks: list[list[Path]] = [[]]
        size = 0.0
        for path in paths:
            encoded = 4 * math.ceil(Path(path).stat().st_size / 3)
            chunk = chunks[-1]
            if chunk and (len(chunk) >= min(self.max_rows, _FILE_CHUNK)
                          or size + encoded > self.max_mb * 1e6):
                chunks.append([])
                size = 0.0
            chunks[-1].append(path)
            size += encoded
        return [chunk for chunk in chunks if chunk]


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


def _image_column(model_input: Any) -> list[Any]:
    # list(): a membership test on the Index builds a hash table on every request.
    if not isinstance(model_input, pd.DataFrame) or "image" not in list(model_input.columns):
        raise _bad_input("input must have a column named 'image' holding base64 JPEG/PNG bytes")
    if len(model_input) == 0:
        raise _bad_input("input has no rows: send at least one image")
    return model_input["image"].tolist()


class BadInput(MlflowException):
    """A request the model cannot answer: HTTP 400 whose message is our one-line reason.

    MLflow's scoring server rewrites a failed prediction's message to "Failed to predict
    data '<the whole request>'. Error: ...", echoing kilobytes of base64 to the client and
    the log. The message here is set once and stays as written.
    """

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):
            self._reason = value


def _bad_input(message: str) -> MlflowException:
    return BadInput(message, error_code=INVALID_PARAMETER_VALUE)


