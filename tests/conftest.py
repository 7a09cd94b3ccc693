"""Shared fixtures: small HAM10000 folders built from the bundled real sample."""

from __future__ import annotations

import os

# pytest-xdist runs two test modules at once on a 2-core machine, and many tests start
# training subprocesses: one OpenMP thread per process keeps torch's spinning threads from
# oversubscribing the cores (measured: a 21 s tuning test took 221 s in the suite without
# this). Set before torch is imported anywhere in the test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from skinml.data.metadata import METADATA_FILE, default_data_dir

FIXTURES = Path(__file__).parent / "fixtures"
FULL_METADATA = FIXTURES / "HAM10000_metadata_full.csv"
REPO = Path(__file__).resolve().parents[1]
# What a user's own runs leave in the project folder (README's main job writes the first two).
USER_RUN_STATE = ("mlflow.db", "mlruns", "optuna.db", "mlartifacts")


def user_run_state() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file a user's runs left in the project folder."""
    state = {}
    for name in USER_RUN_STATE:
        path = REPO / name
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for file in files:
            stat = file.stat()
            state[str(file.relative_to(REPO))] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def _user_runs_untouched() -> Iterator[None]:
    """No test may depend on, or change, the runs a user made in the project folder."""
    before = user_run_state()
    yield
    changed = sorted(set(before.items()) ^ set(user_run_state().items()))
    assert not changed, f"tests changed the user's runs in {REPO}: {changed[:5]}"


def tiny(data_dir: Path, *extra: str) -> list[str]:
    """Config overrides for a fast CPU run: 32 px, the small ResNeXt, 2 epochs."""
    return [f"data.dir={data_dir}", "data.cache_size=40", "model.arch=resnext_small",
            "model.image_size=32", "optim.epochs=2", "optim.batch_size=16",
            "optim.warmup_epochs=0.5", "runtime.progress=false", "runtime.bootstrap=50", *extra]


@contextlib.contextmanager
def refused_statements() -> Iterator[list[str]]:
    """Every statement a database refused meanwhile (first lines), retried or not.

    A run should make none: MLflow inserts the final metrics a second time when the model
    is logged after them, and the store refuses the duplicates (PostgreSQL's psycopg then
    warns "pipeline aborted").
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    refused: list[str] = []

    def on_error(context) -> None:
        refused.append(str(context.original_exception).splitlines()[0])

    event.listen(Engine, "handle_error", on_error)
    try:
        yield refused
    finally:
        event.remove(Engine, "handle_error", on_error)


@contextlib.contextmanager
def isolated_tracking(folder: Path) -> Iterator[str]:
    """A fresh SQLite tracking store in `folder`, also the working dir (so ./mlruns is there)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for leaky in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            patch.setenv(leaky, "")  # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID;
            patch.delenv(leaky)  # this restores the variable's absence afterwards
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture
def tracking(tmp_path: Path) -> Iterator[str]:
    with isolated_tracking(tmp_path) as uri:
        yield uri


PG = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def postgres() -> Iterator[list[str]]:
    """Two fresh databases on the PostgreSQL at 127.0.0.1:5432, dropped afterwards."""
    import psycopg

    names = [f"skinml_test_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                         autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield [f"{PG}/{name}" for name in names]
        finally:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test writes to ~/.cache: each gets its own SKINML_CACHE."""
    monkeypatch.setenv("SKINML_CACHE", str(tmp_path_factory.mktemp("cache")))


def build_folder(root: Path, layout: str = "flat", lesions_per_class: int = 3) -> Path:
    """A small real HAM10000 folder: the first `lesions_per_class` whole lesions of each class.

    layout "flat" puts the JPEGs at the root; "parts" splits them over
    HAM10000_images_part_1/ and HAM10000_images_part_2/ as the dataset ships.
    """
    metadata = pd.read_csv(default_data_dir() / METADATA_FILE)
    root.mkdir(parents=True)
    first_lesions = (metadata.drop_duplicates("lesion_id")
                     .groupby("dx").head(lesions_per_class)["lesion_id"])
    rows = metadata[metadata["lesion_id"].isin(first_lesions)]
    for i, image_id in enumerate(rows["image_id"]):
        folder = root
        if layout == "parts":
            folder = root / f"HAM10000_images_part_{1 + i % 2}"
            folder.mkdir(exist_ok=True)
        shutil.copy(default_data_dir() / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    rows.to_csv(root / METADATA_FILE, index=False)
    return root


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """build_folder in this test's tmp_path: make_folder(name, layout, lesions_per_class)."""

    def make(name: str = "ham", layout: str = "flat", lesions_per_class: int = 3) -> Path:
        return build_folder(tmp_path / name, layout, lesions_per_class)

    return make
