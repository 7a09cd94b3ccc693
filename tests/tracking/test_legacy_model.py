"""A model logged before the layered layout (skinml at 60b1735, tests/fixtures/README.md)
still loads and predicts in a process running today's skinml: its `pyfunc_entry.py` imports
`skinml.packaging.SkinLesionModel`, which is kept for exactly that."""

from __future__ import annotations

import tarfile

import mlflow
import numpy as np
import pandas as pd
import pytest

import skinml.packaging
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.tracking.pyfunc import SkinLesionModel

from ..conftest import FIXTURES, SAMPLE_IMAGES, image_frame

LEGACY = FIXTURES / "legacy-model-60b1735.tar.gz"
EXPECTED = FIXTURES / "legacy-model-60b1735.csv"  # its answers, from the code that logged it


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory: pytest.TempPathFactory) -> mlflow.pyfunc.PyFuncModel:
    folder = tmp_path_factory.mktemp("legacy")
    with tarfile.open(LEGACY) as archive:
        archive.extractall(folder, filter="data")
    return mlflow.pyfunc.load_model(str(folder / "model"))


def test_the_legacy_entry_imports_the_old_module_path():
    with tarfile.open(LEGACY) as archive:
        entry = archive.extractfile("model/pyfunc_entry.py").read().decode()
    assert "from skinml.packaging import SkinLesionModel" in entry
    assert skinml.packaging.SkinLesionModel is SkinLesionModel


def test_a_model_logged_before_the_move_predicts_as_it_did_then(legacy_model):
    served = legacy_model.unwrap_python_model()
    assert type(served) is SkinLesionModel  # today's class, not the copy in the model's code/
    expected = pd.read_csv(EXPECTED)
    images = [next(p for p in SAMPLE_IMAGES if p.stem == stem) for stem in expected["image"]]
    answer = legacy_model.predict(image_frame(images))
    assert answer["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(answer[list(PROBABILITY_COLUMNS)].to_numpy(),
                               expected[list(PROBABILITY_COLUMNS)].to_numpy(), atol=1e-6)
