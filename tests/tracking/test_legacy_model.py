"""Models logged by earlier skinml still load and predict in a process running today's
skinml (tests/fixtures/README.md): each carries its own `pyfunc_entry.py`, which imports the
served model's class from where it lived when the model was logged."""

from __future__ import annotations

import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.inference.pyfunc import SkinLesionModel

from ..conftest import FIXTURES, SAMPLE_IMAGES, image_frame

# (fixture, the import line its entry holds): one model per place the class has lived
LOGGED = [("legacy-model-60b1735", "from skinml.packaging import SkinLesionModel"),
          ("model-deeffd3", "from skinml.tracking.pyfunc import SkinLesionModel"),
          ("model-f1bb492", "from skinml.inference.pyfunc import SkinLesionModel")]


def unpacked(name: str, folder: Path) -> Path:
    with tarfile.open(FIXTURES / f"{name}.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    return folder / "model"


@pytest.mark.parametrize("name, entry", LOGGED, ids=[name for name, _ in LOGGED])
def test_a_model_logged_by_earlier_code_predicts_as_it_did_then(name, entry, tmp_path):
    with tarfile.open(FIXTURES / f"{name}.tar.gz") as archive:
        assert entry in archive.extractfile("model/pyfunc_entry.py").read().decode()
    model = mlflow.pyfunc.load_model(str(unpacked(name, tmp_path)))
    served = model.unwrap_python_model()
    assert type(served) is SkinLesionModel  # today's class, not the copy in the model's code/
    expected = pd.read_csv(FIXTURES / f"{name}.csv")  # its answers, from the code that logged it
    images = [next(p for p in SAMPLE_IMAGES if p.stem == stem) for stem in expected["image"]]
    answer = model.predict(image_frame(images))
    assert answer["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(answer[list(PROBABILITY_COLUMNS)].to_numpy(),
                               expected[list(PROBABILITY_COLUMNS)].to_numpy(), atol=1e-6)
