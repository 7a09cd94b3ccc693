"""A resnext_small at 32 px with a temperature, logged and loaded as skinml logs every model
(untrained: these tests are about packaging, not accuracy)."""

from __future__ import annotations

import mlflow
import pytest
import torch

from skinml.core.config import ModelConfig
from skinml.models import build_model
from skinml.tracking.logged_model import load_model, log_model, model_meta

from ..conftest import SAMPLE_IMAGES, isolated_tracking

TEMPERATURE = 2.5


@pytest.fixture(scope="session")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> mlflow.pyfunc.PyFuncModel:
    root = tmp_path_factory.mktemp("logged-model")
    with isolated_tracking(root):
        torch.manual_seed(0)
        config = ModelConfig(arch="resnext_small", image_size=32, crop_pct=0.875)
        with mlflow.start_run():
            info = log_model(build_model(config).state_dict(),
                             model_meta(config, (40, 53), TEMPERATURE), str(SAMPLE_IMAGES[0]))
        return load_model(info.model_uri)
