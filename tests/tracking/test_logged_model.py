"""Scoring image files with a logged model: the order of the files survives the chunks that
keep each call's base64 small."""

from __future__ import annotations

import numpy as np

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.tracking import logged_model as logged_model_module
from skinml.tracking.logged_model import file_chunks, predict_paths

from ..conftest import SAMPLE_IMAGES, image_frame

IMAGES = SAMPLE_IMAGES[:5]


def test_predict_paths_keeps_file_order_across_chunks(logged_model, monkeypatch):
    whole = logged_model.predict(image_frame(IMAGES))[list(PROBABILITY_COLUMNS)].to_numpy()
    monkeypatch.setattr(logged_model_module, "FILE_CHUNK", 2)  # 5 files: chunks of 2, 2 and 1
    np.testing.assert_allclose(predict_paths(logged_model, [str(p) for p in IMAGES]), whole,
                               atol=1e-6)


def test_file_chunks_cut_a_file_list_by_count_and_by_bytes(tmp_path):
    paths = []
    for i, size in enumerate([300, 300, 300, 600, 30]):  # base64: 400, 400, 400, 800, 40
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b"x" * size)
    assert file_chunks(paths, max_files=2) == [paths[:2], paths[2:4], paths[4:]]
    assert file_chunks(paths, max_mb=0.0009) == [
        paths[:2], paths[2:3], paths[3:]]
