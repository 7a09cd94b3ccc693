"""A resnext_small at 32 px with a temperature, logged and loaded as skinml logs every model
(untrained: these tests are about packaging, not accuracy)."""

from __future__ import annotations

import mlflow
import pytest

from skinml.tracking.logged_model import load_model

from ..conftest import isolated_tracking, log_tiny_model

TEMPERATURE = 2.5


@pytest.fixture(scope="session")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> mlflow.pyfunc.PyFuncModel:
    root = tmp_path_factory.mktemp("logged-model")
    logged = log_tiny_model(root, TEMPERATURE)
    with isolated_tracking(root):
        return load_model(logged.model_uri)
