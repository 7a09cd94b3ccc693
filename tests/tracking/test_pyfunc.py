"""The served model in-process: preprocessing and temperature travel with it, TTA, request
limits, and one-line errors naming the row."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data.preprocess import Preprocess
from skinml.evaluation.calibration import apply_temperature
from skinml.tracking import pyfunc
from skinml.tracking.logged_model import predict_paths

from ..conftest import SAMPLE_IMAGES, image_frame
from .conftest import TEMPERATURE

IMAGES = SAMPLE_IMAGES[:5]


def test_the_preprocessing_and_temperature_travel_with_the_model(logged_model):
    served = logged_model.unwrap_python_model()
    assert served.preprocess == Preprocess(32, 0.875, (40, 53))
    assert served.temperature == TEMPERATURE


def test_calibrated_false_is_the_softmax_the_temperature_was_fitted_on(logged_model):
    calibrated = logged_model.predict(image_frame(IMAGES))
    raw = logged_model.predict(image_frame(IMAGES), params={"calibrated": False})
    assert list(calibrated.columns[3:]) == list(PROBABILITY_COLUMNS)
    for table in (calibrated, raw):
        np.testing.assert_allclose(table[list(PROBABILITY_COLUMNS)].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        calibrated[list(PROBABILITY_COLUMNS)].to_numpy(),
        apply_temperature(raw[list(PROBABILITY_COLUMNS)].to_numpy(), TEMPERATURE), atol=1e-5)
    assert calibrated["label"].tolist() == raw["label"].tolist()  # T never changes the argmax


def test_test_time_augmentation_averages_the_eight_views(logged_model):
    plain = logged_model.predict(image_frame(IMAGES[:2]))[list(PROBABILITY_COLUMNS)].to_numpy()
    tta = logged_model.predict(image_frame(IMAGES[:2]),
                               params={"tta": True})[list(PROBABILITY_COLUMNS)]
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tta.to_numpy(), plain)


def test_an_oversized_call_is_refused_before_decoding(logged_model, monkeypatch):
    monkeypatch.setenv(pyfunc.MAX_ROWS_ENV, "2")
    limits = pyfunc.RequestLimits.from_environment()
    with pytest.raises(MlflowException, match=r"request has 3 images; at most 2 per request"):
        limits.check(["not even base64"] * 3)
    whole = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setattr(logged_model.unwrap_python_model(), "limits", limits)
    with pytest.raises(MlflowException, match="at most 2 per request"):
        logged_model.predict(image_frame(IMAGES))
    # predict_paths keeps each call within the limits, so 5 files still work
    np.testing.assert_allclose(predict_paths(logged_model, [str(p) for p in IMAGES]), whole,
                               atol=1e-6)


@pytest.mark.parametrize("value, reason", [
    ("@@@", "row 1: image is not valid base64"),
    (base64.b64encode(b"not an image").decode(), "row 1: image: cannot decode image"),
    ("", "row 1: image must be a non-empty base64 string"),
])
def test_a_bad_row_is_an_invalid_parameter_error_naming_the_row(logged_model, value, reason):
    rows = image_frame(IMAGES[:1])
    rows.loc[1] = value
    with pytest.raises(MlflowException) as raised:
        logged_model.predict(rows)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert reason in raised.value.message
