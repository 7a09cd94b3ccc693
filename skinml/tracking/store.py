"""Which tracking store a command uses: named once by every command that writes runs,
named in every "not found" of a command that reads, and made sure of before runs start."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.pool import Pool

from skinml.core import interrupts
from skinml.core.errors import SkinmlError
from skinml.tracking.retry import retry_create_race

log = logging.getLogger(__name__)

UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
DEFAULT_STORE = Path("mlflow.db")  # MLflow's default: sqlite:///mlflow.db in the working dir


def _hold_interrupts_while_connected() -> None:
    """A Ctrl-C waits while a store connection is checked out: one raised inside SQLAlchemy's
    transaction can leave SQLite locked, and the run could not then be marked KILLED."""
    if event.contains(Pool, "checkout", _checked_out):
        return
    event.listen(Pool, "checkout", _checked_out)
    event.listen(Pool, "checkin", _checked_in)


def _checked_out(dbapi_connection, record, proxy) -> None:
    interrupts.hold(id(record))


def _checked_in(dbapi_connection, record) -> None:
    interrupts.release(id(record))


_hold_interrupts_while_connected()


def require_tracking_store(model_uri: str | None = None) -> None:
    """Refuse to read from a SQLite tracking store that does not exist.

    Any MLflow call would create an empty `mlflow.db` first and then fail to find the run
    or model; a command that only reads must fail without leaving that file behind.
    `model_uri`: only `models:/` and `runs:/` URIs need the store (a path does not).
    """
    if model_uri is not None and not model_uri.startswith(("models:/", "runs:/")):
        return
    path = _sqlite_path(mlflow.get_tracking_uri())
    if path is not None and not path.is_file():
        if _uri_from_environment():
            raise SkinmlError(f"no MLflow tracking store at {path} (MLFLOW_TRACKING_URI): "
                              "point MLFLOW_TRACKING_URI at the store you trained in")
        raise SkinmlError(f"no MLflow tracking store at {path}: run this in the folder "
                          "you trained in, or set MLFLOW_TRACKING_URI")


def shown_uri() -> str:
    """The tracking URI with a relative SQLite path made absolute: the store a person can
    find again from any folder."""
    return absolute_sqlite_uri(mlflow.get_tracking_uri())


def absolute_sqlite_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (any other URI as it is)."""
    path = _sqlite_path(uri)
    if path is None or uri == "sqlite:///:memory:":
        return uri
    return f"sqlite:///{path.resolve()}"


@functools.cache
def announce_store() -> None:
    """Name the store once per process, the first time a run starts: a command run from
    another folder otherwise fills a second, silent `mlflow.db` there."""
    uri = shown_uri()
    if uri.startswith(("http://", "https://")):
        log.info("tracking store %s (MLFLOW_TRACKING_URI)", uri)
        return
    path = _sqlite_path(mlflow.get_tracking_uri())
    ui = "mlflow ui" if path is not None and _is_default(path) else \
        f"mlflow ui --backend-store-uri {uri}"
    log.info("tracking store %s (browse: `%s`; MLFLOW_TRACKING_URI picks another)", uri, ui)


# MLflow 3's UI opens a link in its GenAI view unless the link names the workflow (the
# experiment's mlflow.experimentKind tag does not decide it for a browser that has not used
# the UI before; checked in headless Chromium against mlflow ui 3.17).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI's Model training view: on the tracking server, or on
    `mlflow ui`."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def store_hint(model_uri: str | None = None) -> str:
    """What to add to a "not found": which store was read, and, when it holds no runs and
    no models at all, how to point at the one the user trained in. Nothing for a
    `model_uri` that is a path (it was not looked for in the store)."""
    if model_uri is not None and not model_uri.startswith(("models:/", "runs:/")):
        return ""
    uri = shown_uri()
    try:
        client = MlflowClient()
        empty = not client.search_registered_models(max_results=1) and not mlflow.search_runs(
            search_all_experiments=True, max_results=1, output_format="list")
    except MlflowException:
        empty = False
    if empty and _uri_from_environment():
        return (f" (read {uri}, from MLFLOW_TRACKING_URI, which holds no runs and no "
                "models: point MLFLOW_TRACKING_URI at the store you trained in)")
    if empty:
        return (f" (read {uri}, which holds no runs and no models: run this where you "
                "trained, or set MLFLOW_TRACKING_URI to that store)")
    return f" (read {uri})"


@functools.cache
def open_store() -> None:
    """Touch the tracking store once per process, so its tables exist before any run starts
    (commands started together on an empty database race to create them)."""
    retry_create_race(lambda: MlflowClient().search_experiments(max_results=1),
                      "the tables of the tracking store")


def use_store(uri: str) -> None:
    """Track into `uri` in this process from now on."""
    mlflow.set_tracking_uri(uri)


def _uri_from_environment() -> bool:
    """Whether the store in use is the one MLFLOW_TRACKING_URI names (so a hint to set it
    would be wrong)."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _is_default(path: Path) -> bool:
    return path.resolve() == DEFAULT_STORE.resolve()
