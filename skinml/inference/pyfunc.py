"""The served model: base64 JPEG/PNG in (with age, sex and body site for a model that
fuses them), diagnosis and class probabilities out.

MLflow builds it from code at load time (`pyfunc_entry.py`), so no pickled object is ever
loaded; the weights and their metadata (architecture, classes, preprocessing) travel in
one plain checkpoint opened with `weights_only=True`. A call's rows are checked against
the request limits (`requests.py`), decoded (`decoder.py`), and run through the one
batching path every caller shares (`coalescer.py`): `mlflow models serve`'s worker
threads, MLServer's, in-process predict and `skinml predict` alike.
`tracking/logged_model.py` logs and loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from skinml.core.config import ModelConfig
from skinml.core.labels import CLASSES, DIAGNOSES, PROBABILITY_COLUMNS
from skinml.data.clinical import ClinicalValueError, encode_clinical
from skinml.data.preprocess import Preprocess
from skinml.inference.coalescer import BatchTimeout, Coalescer
from skinml.inference.decoder import ParallelDecoder
from skinml.inference.requests import RequestLimits, bad_row, image_column
from skinml.models import build_model, run_network

# Images per forward pass: any number of rows runs in chunks, so memory holds the input,
# the output and at most two chunks of pixels (one decoding while the other runs).
CHUNK = 64


class SkinLesionModel(PythonModel):
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
        if self.preprocess.frame is None:  # every logged model has one (model_meta)
            raise MlflowException("model meta has no frame to fit images to")
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
        images = image_column(model_input)
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
            raise bad_row(exc.row, exc.reason) from None

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
    clinical = [part.clinical for part in parts if part.clinical is not None]
    return _Rows(pixels, np.concatenate(clinical) if clinical else None)


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


