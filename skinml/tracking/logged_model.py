"""Logging the served model to a run, loading it back, and scoring image files with it.

`log_model` writes the weights with their metadata, copies the skinml package next to them
(MLflow puts it on the path of whoever loads the model) and names `pyfunc_entry.py` as the
model's code; `predict_paths` is how every workflow calls a model: exactly as it is served.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PyFuncModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType
from PIL import Image

from skinml.core.clinical import CLINICAL_COLUMNS
from skinml.core.config import ModelConfig
from skinml.core.errors import SkinmlError, first_line
from skinml.core.labels import CLASSES, ISIC_COLUMNS, PROBABILITY_COLUMNS, probability_column
from skinml.data.clinical import encode_clinical
from skinml.data.decode import open_rgb
from skinml.data.preprocess import Preprocess
from skinml.inference.decoder import MAX_PIXELS
from skinml.inference.requests import encode_image
from skinml.tracking.store import store_hint

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = 1
PACKAGE = Path(__file__).parents[1]  # the skinml package, copied into every logged model
ENTRY = PACKAGE / "inference" / "pyfunc_entry.py"  # the file MLflow builds the model from
# Image files read and encoded per predict call: a 10,000-image set never sits in memory as
# base64 at once (the model then runs each call in chunks of its own).
FILE_CHUNK, FILE_CHUNK_MB = 256, 64
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
# A fusion model's optional inputs. Typed Any: the model checks each value itself, so a
# bad one is refused with a line naming its row and column (MLflow's own type check names
# neither), and a column may mix numbers with nulls.
FUSION_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"),
                   *[ColSpec(AnyType(), column, required=False)
                     for column in CLINICAL_COLUMNS]]),
    outputs=SIGNATURE.outputs, params=SIGNATURE.params)


def model_meta(model: ModelConfig, frame: tuple[int, int], temperature: float = 1.0
               ) -> dict[str, Any]:
    """What serving needs to rebuild and feed the network exactly as evaluation did.

    `temperature` (fitted on validation) divides the logits, so served probabilities are
    calibrated.
    """
    height, width = frame
    preprocess = Preprocess(model.image_size, model.crop_pct, (height, width))
    return {"arch": model.arch, "drop_rate": model.drop_rate, "classes": list(CLASSES),
            **preprocess.to_meta(), "temperature": float(temperature),
            "metadata": model.metadata}


def reads_clinical(model: PyFuncModel) -> bool:
    """Whether a loaded model takes age, sex and localization (a fusion model)."""
    schema = model.metadata.get_input_schema()
    return schema is not None and "localization" in schema.input_names()


def save_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                 members: list[dict[str, Any]] | None = None) -> None:
    """One network's weights, or an ensemble's `members` ({"weights", "temperature"} each,
    same architecture and preprocessing as `meta`)."""
    payload = {"format": WEIGHTS_FORMAT, "meta": meta}
    torch.save(payload | ({"members": members} if members else {"weights": weights}), path)



def pinned_requirements() -> list[str]:
    """The running versions of what the model imports (local tags like +cu130 dropped)."""
    return [f"{name}=={package_metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]


def example_jpeg(path: str, max_side: int = 96) -> bytes:
    """A small JPEG of a real image: the logged model's input example."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def log_model(weights: dict[str, torch.Tensor], meta: dict[str, Any], example_image: str,
              members: list[dict[str, Any]] | None = None,
              example_clinical: dict[str, Any] | None = None) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc model named `model` to the active run (`example_image`: a file, with
    its age, sex and localization in `example_clinical` for a fusion model); `members`
    make it an ensemble (see `save_weights`)."""
    fusion = meta.get("metadata", "none") != "none"
    example = {"image": [encode_image(example_jpeg(example_image))]}
    if fusion:
        example |= {column: [value] for column, value in (example_clinical or {}).items()
                    if column in CLINICAL_COLUMNS and not pd.isna(value)}
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = Path(tmp) / "weights.pt"
        save_weights(weights_path, weights, meta, members)
        code = Path(tmp) / "skinml"
        shutil.copytree(PACKAGE, code,
                        ignore=shutil.ignore_patterns("__pycache__", "sample", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY),
            artifacts={"weights": str(weights_path)},
            code_paths=[str(code)],
            signature=FUSION_SIGNATURE if fusion else SIGNATURE,
            input_example=pd.DataFrame(example),
            pip_requirements=pinned_requirements(),
        )


def load_model(model_uri: str) -> PyFuncModel:
    """mlflow.pyfunc.load_model with a one-line error for a bad URI."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise SkinmlError(f"cannot load model {model_uri}: {reason}{store_hint(model_uri)}") \
            from None


def note_images_alone(model: PyFuncModel, model_uri: str) -> None:
    """Say once that a fusion model scoring files gets no metadata (image files carry none)."""
    if reads_clinical(model):
        log.info("%s reads age, sex and localization; image files carry none, so each image "
                 "is scored with them not recorded (send them as columns to a served model)",
                 model_uri)


def model_identity(model: PyFuncModel) -> str:
    """What names this exact model whatever URI reached it (an alias may move): its logged
    model id, else its MLmodel uuid."""
    metadata = model.metadata
    return str(getattr(metadata, "model_id", None) or metadata.model_uuid)


def predict_files(model_uri: str, paths: list[Path], tta: bool = False) -> pd.DataFrame:
    """Load a logged or registered model and predict image files; rows indexed by image name."""
    for path in paths:  # a bad file is named here, not as "row N" of a batch
        open_rgb(path, max_pixels=MAX_PIXELS)
    model = load_model(model_uri)
    note_images_alone(model, model_uri)
    table = pd.concat([model.predict(_encoded(chunk), params={"tta": tta})
                       for chunk in file_chunks(paths)])
    table.index = pd.Index([Path(p).stem for p in paths], name="image")
    return table


def predict_paths(model: PyFuncModel, paths: list[str], tta: bool = False,
                  calibrated: bool = True, clinical: pd.DataFrame | None = None
                  ) -> np.ndarray:
    """Class probabilities (rows in `paths` order) of image files, exactly as served.

    `clinical` (age, sex, localization; one row per path) goes with the images to a model
    that reads them; an image-only model gets the images alone. Files are read and encoded
    a chunk at a time (`file_chunks`).
    """
    if clinical is not None and not reads_clinical(model):
        clinical = None
    if clinical is not None:  # a bad value is named by its image here, not as "row N" of a chunk
        encode_clinical(clinical, names=[f"image {Path(p).stem}" for p in paths])
    chunks, start = [], 0
    for chunk in file_chunks(paths):
        frame = _encoded(chunk)
        if clinical is not None:
            rows = clinical.iloc[start:start + len(chunk)]
            frame = frame.assign(**{column: rows[column].to_numpy(dtype=object)
                                    for column in CLINICAL_COLUMNS if column in rows})
        start += len(chunk)
        answer = model.predict(frame, params={"tta": tta, "calibrated": calibrated})
        table = cast(pd.DataFrame, answer)  # SkinLesionModel.predict's; mlflow types any output
        chunks.append(table[list(PROBABILITY_COLUMNS)].to_numpy(dtype=np.float64))
    return np.concatenate(chunks)


def file_chunks(paths: Sequence[str | Path], max_files: int | None = None,
                max_mb: float | None = None) -> list[list[str | Path]]:
    """`paths` cut into calls of at most `max_files` files and `max_mb` MB of base64
    (FILE_CHUNK and FILE_CHUNK_MB by default)."""
    max_files, max_mb = max_files or FILE_CHUNK, max_mb or FILE_CHUNK_MB
    chunks: list[list[str | Path]] = [[]]
    size = 0.0
    for path in paths:
        encoded = 4 * math.ceil(Path(path).stat().st_size / 3)
        if chunks[-1] and (len(chunks[-1]) >= max_files or size + encoded > max_mb * 1e6):
            chunks.append([])
            size = 0.0
        chunks[-1].append(path)
        size += encoded
    return [chunk for chunk in chunks if chunk]


def _encoded(paths: Sequence[str | Path]) -> pd.DataFrame:
    return pd.DataFrame({"image": [encode_image(Path(p).read_bytes()) for p in paths]})


def isic_submission(table: pd.DataFrame) -> pd.DataFrame:
    """ISIC 2018 Task 3 format: image, MEL, NV, BCC, AKIEC, BKL, DF, VASC."""
    return pd.DataFrame({"image": table.index,
                         **{column: table[probability_column(dx)].to_numpy()
                            for column, dx in ISIC_COLUMNS.items()}})
