"""An untrained served model for the Grad-CAM tests of explain and reports."""

from __future__ import annotations

import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from skinml.core.config import ModelConfig
from skinml.inference.pyfunc import SkinLesionModel
from skinml.models import build_model
from skinml.tracking.logged_model import model_meta, save_weights


@pytest.fixture(scope="module")
def gradcam_model(tmp_path_factory):
    """An untrained resnext_small at 96 px, loaded as serving loads it (3x3 feature map)."""
    torch.manual_seed(0)
    config = ModelConfig(arch="resnext_small", image_size=96)
    path = tmp_path_factory.mktemp("gradcam") / "weights.pt"
    save_weights(path, build_model(config).state_dict(), model_meta(config, (120, 160)))
    served = SkinLesionModel()
    served.load_context(PythonModelContext({"weights": str(path)}, {}))
    return served
