"""The logged pyfunc model: base64 JPEG/PNG in, diagnosis and class probabilities out.

Logged as MLflow "models from code" (`pyfunc_entry.py` builds the model at load time), so
no pickled object is ever loaded; the weights and their metadata (architecture, classes,
preprocessing) travel in one plain checkpoint opened with `weights_only=True`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from skinml.batching import Coalescer
from skinml.config import ModelConfig
from skinml.data.decode import fit_to_frame, open_rgb
from skinml.data.preprocess import Preprocess
from skinml.errors import SkinmlError, first_line
from skinml.labels import (
    CLASSES,
    DIAGNOSES,
    ISIC_COLUMNS,
    PROBABILITY_COLUMNS,
    probability_column,
)
from skinml.model import build_model

WEIGHTS_FORMAT = 1
MAX_PIXELS = 50_000_000  # 7000x7000; real dermoscopy images are far smaller
CHUNK = 64  # images per forward pass: a 10,000-row request does not exhaust memory
_FILE_CHUNK = 256  # image files read and encoded per predict call (predict_paths)
# Limits on one request, checked before any image is decoded (a client cannot make the
# server decode 100,000 images or hold gigabytes of pixels for one call).
MAX_ROWS_ENV, MAX_ROWS = "SKINML_SERVE_MAX_ROWS", 256
MAX_REQUEST_MB_ENV, MAX_REQUEST_MB = "SKINML_SERVE_MAX_REQUEST_MB", 64
_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "numpy", "pandas", "pillow", "pyyaml",
                 "scikit-learn", "tqdm")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("string", "diagnosis"),
                    ColSpec("double", "confidence"),
                    *[ColSpec("double", column) for column in PROBABILITY_COLUMNS]]),
    # calibrated=false returns softmax(z) without the temperature (for skinml evaluate).
    params=ParamSchema([ParamSpec("tta", "boolean", False),
                        ParamSpec("calibrated", "boolean", True)]),
)


def model_meta(model: ModelConfig, frame: tuple[int, int], temperature: float = 1.0
               ) -> dict[str, Any]:
    """What serving needs to rebuild and feed the network exactly as evaluation did.

    `temperature` (fitted on validation) divides the logits, so served probabilities are
    calibrated.
    """
    preprocess = Preprocess(model.image_size, model.crop_pct, tuple(frame))
    return {"arch": model.arch, "drop_rate": model.drop_rate, "classes": list(CLASSES),
            **preprocess.to_meta(), "temperature": float(temperature)}


def save_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                 members: list[dict[str, Any]] | None = None) -> None:
    """One network's weights, or an ensemble's `members` ({"weights", "temperature"} each,
    same architecture and preprocessing as `meta`)."""
    payload = {"format": WEIGHTS_FORMAT, "meta": meta}
    torch.save(payload | ({"members": members} if members else {"weights": weights}), path)


def encode_image(image_bytes: bytes) -> str:
    return base64.b64encode(image_bytes).decode("ascii")


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


def pinned_requirements() -> list[str]:
    """The running versions of what the model imports (local tags like +cu130 dropped)."""
    return [f"{name}=={package_metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def example_jpeg(path: str, max_side: int = 96) -> bytes:
    """A small JPEG of a real image: the logged model's input example."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def log_model(weights: dict[str, torch.Tensor], meta: dict[str, Any], example_image: str,
              members: list[dict[str, Any]] | None = None) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc model named `model` to the active run (`example_image`: a file);
    `members` make it an ensemble (see `save_weights`)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = Path(tmp) / "weights.pt"
        save_weights(weights_path, weights, meta, members)
        code = Path(tmp) / "skinml"
        shutil.copytree(Path(__file__).parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "sample", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_ENTRY),
            artifacts={"weights": str(weights_path)},
            code_paths=[str(code)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [encode_image(example_jpeg(example_image))]}),
            pip_requirements=pinned_requirements(),
        )


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """mlflow.pyfunc.load_model with a one-line error for a bad URI."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise SkinmlError(f"cannot load model {model_uri}: {reason}") from None


def predict_files(model_uri: str, paths: list[Path], tta: bool = False) -> pd.DataFrame:
    """Load a logged or registered model and predict image files; rows indexed by image name."""
    for path in paths:  # a bad file is named here, not as "row N" of a batch
        open_rgb(path, max_pixels=MAX_PIXELS)
    model = load_model(model_uri)
    table = pd.concat([model.predict(_encoded(chunk), params={"tta": tta})
                       for chunk in RequestLimits.from_environment().chunks(paths)])
    table.index = pd.Index([Path(p).stem for p in paths], name="image")
    return table


def predict_paths(model: mlflow.pyfunc.PyFuncModel, paths: list[str], tta: bool = False,
                  calibrated: bool = True) -> np.ndarray:
    """Class probabilities (rows in `paths` order) of image files, exactly as served.

    Files are read and encoded a chunk at a time, so a 10,000-image set never sits in
    memory as base64 at once.
    """
    chunks = []
    for chunk in RequestLimits.from_environment().chunks(paths):
        table = model.predict(_encoded(chunk), params={"tta": tta, "calibrated": calibrated})
        chunks.append(table[list(PROBABILITY_COLUMNS)].to_numpy(dtype=np.float64))
    return np.concatenate(chunks)


def _encoded(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"image": [encode_image(Path(p).read_bytes()) for p in paths]})


def isic_submission(table: pd.DataFrame) -> pd.DataFrame:
    """ISIC 2018 Task 3 format: image, MEL, NV, BCC, AKIEC, BKL, DF, VASC."""
    return pd.DataFrame({"image": table.index,
                         **{column: table[probability_column(dx)].to_numpy()
                            for column, dx in ISIC_COLUMNS.items()}})
