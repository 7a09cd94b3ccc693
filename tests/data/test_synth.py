"""Synthetic HAM10000-shaped folders: loadable, HAM-like, and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

from skinml.core.labels import CLASSES
from skinml.data import DataError, load_ham10000
from skinml.data.split import split_by_lesion

from ..conftest import skinml_in_process


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from skinml.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "ham"
    return write_synthetic(out, 300, seed=3, width=96, height=72, progress=False)


def test_synthetic_folder_loads_and_splits(synthetic):
    frame = load_ham10000(synthetic)
    assert len(frame) == 300
    assert set(frame["dx"]) == set(CLASSES)
    counts = frame["dx"].value_counts()
    assert counts.idxmax() == "nv" and counts["nv"] > 0.6 * len(frame)
    assert frame.groupby("lesion_id").size().between(1, 4).all()
    assert frame["lesion_id"].nunique() < len(frame)  # some lesions have several images
    assert split_by_lesion(frame).nunique() == 3
    assert Image.open(frame["path"][0]).size == (96, 72)


def test_synthetic_classes_are_learnable(synthetic):
    frame = load_ham10000(synthetic)
    features = np.stack([np.asarray(Image.open(p).resize((12, 9)), dtype=np.float32).ravel()
                         / 255 for p in frame["path"]])
    folds = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=0)
    model = LogisticRegression(max_iter=3000, class_weight="balanced")
    predicted = cross_val_predict(model, features, frame["label"], groups=frame["lesion_id"],
                                  cv=folds)
    # chance is 1/7; tiny thumbnails and a linear model already separate the classes
    assert balanced_accuracy_score(frame["label"], predicted) > 0.6


def test_same_seed_same_folder(tmp_path):
    from skinml.data.synth import write_synthetic

    a = write_synthetic(tmp_path / "a", 30, seed=5, width=32, height=24, progress=False)
    b = write_synthetic(tmp_path / "b", 30, seed=5, width=32, height=24, progress=False)
    assert (a / "HAM10000_metadata.csv").read_text() == (b / "HAM10000_metadata.csv").read_text()
    assert (a / "SYN_0000007.jpg").read_bytes() == (b / "SYN_0000007.jpg").read_bytes()


def test_parts_layout_from_the_cli(tmp_path):
    out = tmp_path / "parts"
    result = skinml_in_process("data", "synth", str(out), "--n", "40", "--width", "32",
                               "--height", "24", "--layout", "parts")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_metadata.csv"]
    assert len(load_ham10000(out)) == 40


def test_synth_refuses_a_non_empty_folder_and_tiny_n(tmp_path):
    from skinml.data.synth import write_synthetic

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        write_synthetic(tmp_path / "busy", 30)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    result = skinml_in_process("data", "synth", str(tmp_path / "x"), "--n", "5")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --n must be at least 21 (three images per class), got 5"
    assert not (tmp_path / "x").exists()
