"""The served model in-process: preprocessing and temperature travel with it, TTA, request
limits only behind a server, any number of rows in chunks decoded in parallel with the
training cache's pixels, and one-line errors naming the row."""

from __future__ import annotations

import base64
import gc
import threading
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data.decode import decode_to_frame
from skinml.data.preprocess import Preprocess
from skinml.evaluation.calibration import apply_temperature
from skinml.inference import decoder as decoding
from skinml.inference import requests
from skinml.inference.requests import encode_image
from skinml.tracking.logged_model import example_jpeg

from ..conftest import SAMPLE_IMAGES, TEMPERATURE, b64, cuda_test, image_frame

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


def test_limits_apply_only_behind_mlflows_scoring_server(monkeypatch):
    """MLflow's scoring server sets this variable in every worker before loading the model;
    a user's own process (predict, `mlflow models predict`, spark_udf) has none."""
    from mlflow.pyfunc import scoring_server

    assert requests.SCORING_SERVER_ENV == scoring_server._SERVER_MODEL_PATH
    monkeypatch.delenv(requests.SCORING_SERVER_ENV, raising=False)
    monkeypatch.setenv(requests.MAX_ROWS_ENV, "2")
    assert requests.RequestLimits.for_this_process() == requests.RequestLimits(None, None)
    monkeypatch.setenv(requests.SCORING_SERVER_ENV, "file:///models/m-1")
    assert requests.RequestLimits.for_this_process() == requests.RequestLimits(2, 64)
    monkeypatch.delenv(requests.MAX_ROWS_ENV)
    assert requests.RequestLimits.for_this_process() == requests.RequestLimits(256, 64)


def test_an_oversized_request_is_refused_before_decoding(logged_model, monkeypatch):
    served = logged_model.unwrap_python_model()
    assert served.limits == requests.RequestLimits(None, None)  # loaded in this process
    monkeypatch.setattr(served, "limits", requests.RequestLimits(max_rows=2))
    with pytest.raises(MlflowException, match=r"request has 3 images; at most 2 per request"):
        logged_model.predict(pd.DataFrame({"image": ["not even base64"] * 3}))
    monkeypatch.setattr(served, "limits", requests.RequestLimits(max_mb=0.00001))
    with pytest.raises(MlflowException, match=r"request holds 0.0 MB of images; at most 1e-05"):
        logged_model.predict(pd.DataFrame({"image": ["not even base64"] * 3}))


def test_rows_run_in_chunks_in_order_and_a_bad_row_is_named_by_its_place(logged_model):
    """150 rows: three chunks decoded ahead of their forward passes, answers in row order,
    each equal to the row predicted alone; a bad row in the last chunk names row 149."""
    tiny = [encode_image(example_jpeg(str(path), 53)) for path in IMAGES]
    rows = pd.DataFrame({"image": [tiny[i % 5] for i in range(150)]})
    table = logged_model.predict(rows)[list(PROBABILITY_COLUMNS)].to_numpy()
    alone = np.concatenate([logged_model.predict(rows.iloc[[i]])[list(PROBABILITY_COLUMNS)]
                            for i in range(5)])
    np.testing.assert_allclose(table, alone[np.arange(150) % 5], atol=1e-5)
    rows.loc[149, "image"] = "@@@"
    with pytest.raises(MlflowException, match="^row 149: image is not valid base64$"):
        logged_model.predict(rows)


def test_a_column_of_arrow_strings_is_read_a_chunk_at_a_time(logged_model):
    """pandas keeps strings in Arrow: turning the whole column into Python strings would
    copy the input (a 20,000-row call held 1.7 GB more). Python allocations while 5,000
    rows of 1.7 KB predict stay far below the 8 MB the column would take as Python strings."""
    tiny = encode_image(example_jpeg(str(IMAGES[0]), 53))
    rows = pd.DataFrame({"image": pd.Series([tiny] * 5000, dtype=pd.StringDtype("pyarrow"))})
    logged_model.predict(rows.iloc[:64])  # warm
    tracemalloc.start()
    try:
        logged_model.predict(rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 5000 * len(tiny) > 8e6 and peak < 3e6, peak


def test_parallel_decode_gives_the_training_caches_pixels(logged_model):
    served = logged_model.unwrap_python_model()
    height, width = served.preprocess.frame
    encoded = [b64(path) for path in IMAGES]
    serial = np.concatenate(list(decoding.ParallelDecoder((height, width), workers=1)
                                 .chunks(encoded, 2)))
    parallel = np.concatenate(list(decoding.ParallelDecoder((height, width), workers=4)
                                   .chunks(encoded, 2)))
    cache = np.stack([decode_to_frame(path, height, width) for path in IMAGES])
    assert serial.dtype == np.uint8 and serial.shape == (5, height, width, 3)
    np.testing.assert_array_equal(serial, cache)
    np.testing.assert_array_equal(parallel, cache)


@pytest.mark.slow
def test_twenty_thousand_rows_predict_in_process(logged_model):
    """No row limit in a user's own process (11 s here: 20,000 small JPEGs)."""
    tiny = [encode_image(example_jpeg(str(path), 53)) for path in SAMPLE_IMAGES[:50]]
    rows = pd.DataFrame({"image": [tiny[i % 50] for i in range(20_000)]})
    table = logged_model.predict(rows)
    assert len(table) == 20_000
    first = logged_model.predict(rows.iloc[:50])
    np.testing.assert_allclose(table[list(PROBABILITY_COLUMNS)].to_numpy()[-50:],
                               first[list(PROBABILITY_COLUMNS)].to_numpy(), atol=1e-5)


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


def test_the_batched_jpeg_path_feeds_the_network_as_the_cpu_decode_does(logged_model,
                                                                         monkeypatch):
    """The GPU decode path (data.jpeg_batch), driven on the CPU here: tensors go through the
    coalescer and the transform; answers within its pixel tolerance; bad rows named."""
    served = logged_model.unwrap_python_model()
    cpu = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setattr(served.decoder, "gpu", torch.device("cpu"))
    batched = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    np.testing.assert_allclose(batched, cpu, atol=1e-3)
    rows = image_frame(IMAGES[:3])
    rows.loc[2, "image"] = base64.b64encode(b"not an image").decode()
    with pytest.raises(MlflowException, match="^row 2: image: cannot decode image"):
        logged_model.predict(rows)


def test_gpu_decode_is_opted_into_and_only_on_cuda(monkeypatch):
    decoder = decoding.ParallelDecoder((40, 53))
    monkeypatch.setenv(decoding.GPU_DECODE_ENV, "1")
    decoder.use(torch.device("cpu"))
    assert decoder.gpu is None
    decoder.use(torch.device("cuda", 0))
    assert decoder.gpu == torch.device("cuda", 0)
    monkeypatch.setenv(decoding.GPU_DECODE_ENV, "0")
    decoder.use(torch.device("cuda", 0))
    assert decoder.gpu is None


@cuda_test
def test_on_cuda_gpu_decode_answers_as_the_cpu_decode(logged_model, monkeypatch):
    served = logged_model.unwrap_python_model()
    cpu = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setenv(decoding.GPU_DECODE_ENV, "1")
    try:
        served.to("cuda")
        assert served.decoder.gpu is not None
        gpu = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    finally:
        monkeypatch.setenv(decoding.GPU_DECODE_ENV, "0")
        served.to("cpu")
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)  # nvjpeg's upsampling differs slightly


@pytest.mark.timeout(60)
def test_the_decode_threads_end_with_the_decoder():
    before = set(threading.enumerate())
    decoder = decoding.ParallelDecoder((40, 53), workers=3)
    rows = [b64(path) for path in SAMPLE_IMAGES[:6]]
    assert len(np.concatenate(list(decoder.chunks(rows, 6)))) == 6
    mine = [t for t in set(threading.enumerate()) - before if t.name.startswith("skinml-decode")]
    assert mine
    del decoder
    gc.collect()
    for thread in mine:
        thread.join(30)
        assert not thread.is_alive(), "a decode thread outlived its decoder"
