"""Which tracking store a command uses, and making sure it is there before runs start."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from skinml.core.errors import SkinmlError
from skinml.tracking.retry import retry_create_race


def require_tracking_store(model_uri: str | None = None) -> None:
    """Refuse to read from a SQLite tracking store that does not exist.

    Any MLflow call would create an empty `mlflow.db` first and then fail to find the run
    or model; a command that only reads must fail without leaving that file behind.
    `model_uri`: only `models:/` and `runs:/` URIs need the store (a path does not).
    """
    if model_uri is not None and not model_uri.startswith(("models:/", "runs:/")):
        return
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SkinmlError(f"no MLflow tracking store at {path}: run this in the folder "
                              "you trained in, or set MLFLOW_TRACKING_URI")


def open_store() -> None:
    """Touch the tracking store once, so its tables exist before any run starts (workers
    started together on an empty database race to create them)."""
    retry_create_race(lambda: MlflowClient().search_experiments(max_results=1),
                      "the tables of the tracking store")


def use_store(uri: str) -> None:
    """Track into `uri` in this process from now on."""
    mlflow.set_tracking_uri(uri)
