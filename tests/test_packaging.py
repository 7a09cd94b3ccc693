"""The pyfunc model on its own: loaded in-process, no server, untrained weights."""

from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from skinml import packaging
from skinml.calibration import apply_temperature
from skinml.config import ModelConfig
from skinml.data.metadata import default_data_dir
from skinml.data.preprocess import Preprocess
from skinml.labels import PROBABILITY_COLUMNS
from skinml.model import build_model

from .conftest import isolated_tracking

IMAGES = sorted(default_data_dir().glob("*.jpg"))[:5]
TEMPERATURE = 2.5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A resnext_small at 32 px with a temperature, logged as skinml logs every model."""
    root = tmp_path_factory.mktemp("packaging")
    with isolated_tracking(root):
        torch.manual_seed(0)
        config = ModelConfig(arch="resnext_small", image_size=32, crop_pct=0.875)
        weights = build_model(config).state_dict()
        with mlflow.start_run():
            info = packaging.log_model(
                weights, packaging.model_meta(config, (40, 53), TEMPERATURE), str(IMAGES[0]))
        yield packaging.load_model(info.model_uri)


def frame(paths) -> pd.DataFrame:
    return pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})


def test_the_preprocessing_and_temperature_travel_with_the_model(model):
    served = model.unwrap_python_model()
    assert served.preprocess == Preprocess(32, 0.875, (40, 53))
    assert served.temperature == TEMPERATURE


def test_calibrated_false_is_the_softmax_the_temperature_was_fitted_on(model):
    calibrated = model.predict(frame(IMAGES))
    raw = model.predict(frame(IMAGES), params={"calibrated": False})
    assert list(calibrated.columns[3:]) == list(PROBABILITY_COLUMNS)
    for table in (calibrated, raw):
        np.testing.assert_allclose(table[list(PROBABILITY_COLUMNS)].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        calibrated[list(PROBABILITY_COLUMNS)].to_numpy(),
        apply_temperature(raw[list(PROBABILITY_COLUMNS)].to_numpy(), TEMPERATURE), atol=1e-5)
    assert calibrated["label"].tolist() == raw["label"].tolist()  # T never changes the argmax


def test_test_time_augmentation_averages_the_eight_views(model):
    plain = model.predict(frame(IMAGES[:2]))[list(PROBABILITY_COLUMNS)].to_numpy()
    tta = model.predict(frame(IMAGES[:2]), params={"tta": True})[list(PROBABILITY_COLUMNS)]
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tta.to_numpy(), plain)


def test_predict_paths_keeps_file_order_across_chunks(model, monkeypatch):
    whole = model.predict(frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setattr(packaging, "_FILE_CHUNK", 2)  # 5 files: chunks of 2, 2 and 1
    np.testing.assert_allclose(packaging.predict_paths(model, [str(p) for p in IMAGES]), whole,
                               atol=1e-6)


def test_request_limits_cut_a_file_list_by_rows_and_by_bytes(tmp_path):
    paths = []
    for i, size in enumerate([300, 300, 300, 600, 30]):  # base64: 400, 400, 400, 800, 40
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b"x" * size)
    assert packaging.RequestLimits(max_rows=2).chunks(paths) == [paths[:2], paths[2:4], paths[4:]]
    assert packaging.RequestLimits(max_mb=0.0009).chunks(paths) == [
        paths[:2], paths[2:3], paths[3:]]


def test_an_oversized_call_is_refused_before_decoding(model, monkeypatch):
    monkeypatch.setenv(packaging.MAX_ROWS_ENV, "2")
    limits = packaging.RequestLimits.from_environment()
    with pytest.raises(MlflowException, match=r"request has 3 images; at most 2 per request"):
        limits.check(["not even base64"] * 3)
    whole = model.predict(frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setattr(model.unwrap_python_model(), "limits", limits)
    with pytest.raises(MlflowException, match="at most 2 per request"):
        model.predict(frame(IMAGES))
    # predict_paths keeps each call within the limits, so 5 files still work
    np.testing.assert_allclose(packaging.predict_paths(model, [str(p) for p in IMAGES]), whole,
                               atol=1e-6)


@pytest.mark.parametrize("value, reason", [
    ("@@@", "row 1: image is not valid base64"),
    (base64.b64encode(b"not an image").decode(), "row 1: image: cannot decode image"),
    ("", "row 1: image must be a non-empty base64 string"),
])
def test_a_bad_row_is_an_invalid_parameter_error_naming_the_row(model, value, reason):
    rows = frame(IMAGES[:1])
    rows.loc[1] = value
    with pytest.raises(MlflowException) as raised:
        model.predict(rows)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert reason in raised.value.message
