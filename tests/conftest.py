"""Shared fixtures and factories: small HAM10000 folders from the bundled real sample,
isolated tracking stores, trained demo runs in them, a served model, the PostgreSQL server.

Test modules import the plain helpers (`DEMO`, `tiny`, `trained_store`, ...) from here and
use the fixtures by name; nothing here is copied into a test module.
"""

from __future__ import annotations

import os

# pytest-xdist runs three test modules at once on a 2-core machine, and many tests start
# training subprocesses: one OpenMP thread per process keeps torch's spinning threads from
# oversubscribing the cores (measured: a 21 s tuning test took 221 s in the suite without
# this). Set before torch is imported anywhere in the test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit  # noqa: E402
import base64
import contextlib
import functools
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
import pytest
from matplotlib import pyplot as plt

from skinml.data.metadata import METADATA_FILE, default_data_dir

if TYPE_CHECKING:  # the factories import torch and the workflows when first used: the
    # controller process of pytest-xdist loads this file and never trains
    from skinml.workflows.registry import Registration
    from skinml.workflows.train import TrainResult

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FULL_METADATA = FIXTURES / "HAM10000_metadata_full.csv"
DEMO = REPO / "experiments" / "demo.yaml"
SEARCH_SPACE = REPO / "experiments" / "search_space.yaml"
SAMPLE_IMAGES = sorted(default_data_dir().glob("*.jpg"))
NAME = "skin-lesion-classifier"  # the registered model's default name
# What a user's own runs leave in the project folder (README's main job writes the first two).
USER_RUN_STATE = ("mlflow.db", "mlruns", "optuna.db", "mlartifacts")


def tiny(data_dir: Path | None, *extra: str) -> list[str]:
    """Config overrides for a fast CPU run: 32 px, the small ResNeXt, 2 epochs (on
    `data_dir`, or the bundled sample when None)."""
    folder = [f"data.dir={data_dir}"] if data_dir is not None else []
    return [*folder, "data.cache_size=40", "model.arch=resnext_small", "model.image_size=32",
            "optim.epochs=2", "optim.batch_size=16", "optim.warmup_epochs=0.5",
            "runtime.progress=false", "runtime.bootstrap=50", *extra]


# --- the user's own runs, and isolated stores ------------------------------------------

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


# mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID into os.environ; left there, it sends a
# later test's child processes to an experiment of another store.
LEAKY_MLFLOW_VARIABLES = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _no_leaked_experiment() -> Iterator[None]:
    """Each test leaves MLflow's experiment and run variables as it found them."""
    before = {name: os.environ.get(name) for name in LEAKY_MLFLOW_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@functools.cache
def _empty_store() -> Path:
    """One empty SQLite tracking store per test process, its schema made by the installed
    MLflow: a fresh store is a copy of it (MLflow's migrations take ~1.7 s a store on 2
    cores; README's main job and the `mlflow run` tests still make theirs from nothing)."""
    folder = Path(tempfile.mkdtemp(prefix="skinml-empty-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return folder / "mlflow.db"


def _copy_empty_store(folder: Path) -> None:
    """`folder/mlflow.db` as MLflow makes it there: its Default experiment's artifacts go to
    `folder/mlruns/0`, as they would had MLflow created the store in `folder`."""
    with contextlib.closing(sqlite3.connect(_empty_store())) as source, \
            contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as copy:
        source.backup(copy)
        with copy:  # one committed transaction
            copy.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                         (str(folder / "mlruns" / "0"),))


@contextlib.contextmanager
def isolated_tracking(folder: Path, made: bool = True) -> Iterator[str]:
    """A fresh SQLite tracking store in `folder`, also the working dir (so ./mlruns is there);
    with `made=False` only its URI: the first command that tracks makes it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        store = folder / "mlflow.db"
        uri = f"sqlite:///{store}"
        if made and not store.exists():
            _copy_empty_store(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for leaky in LEAKY_MLFLOW_VARIABLES:
            patch.setenv(leaky, "")
            patch.delenv(leaky)  # this restores the variable's absence afterwards
        mlflow.set_tracking_uri(uri)
        # an experiment another test made active belongs to another store
        mlflow.tracking.fluent._active_experiment_id = None
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture
def tracking(tmp_path: Path) -> Iterator[str]:
    with isolated_tracking(tmp_path) as uri:
        yield uri


@pytest.fixture
def unmade_tracking(tmp_path: Path) -> Iterator[str]:
    """`tracking` before any command made the store: for tests that a command made none."""
    with isolated_tracking(tmp_path, made=False) as uri:
        yield uri


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test writes to ~/.cache: each gets its own SKINML_CACHE."""
    monkeypatch.setenv("SKINML_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    """Figures a test drew are closed after it (matplotlib keeps them all otherwise)."""
    yield
    plt.close("all")


def fits_inside(inner, outer) -> bool:
    """Whether a drawn bounding box lies within another (half a pixel of slack)."""
    return (inner.x0 >= outer.x0 - 0.5 and inner.x1 <= outer.x1 + 0.5
            and inner.y0 >= outer.y0 - 0.5 and inner.y1 <= outer.y1 + 0.5)


# --- folders -------------------------------------------------------------------------

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


def b64(path: Path) -> str:
    """A file's bytes as the served model's `image` column holds them."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def image_frame(paths: Sequence[Path]) -> pd.DataFrame:
    """The served model's input for image files."""
    return pd.DataFrame({"image": [b64(path) for path in paths]})


def post_json(url: str, payload=None, raw: bytes | None = None) -> tuple[int, dict]:
    """POST JSON (or `raw` bytes) to a local server: (status, the JSON answer)."""
    from skinml.serving.server import DIRECT

    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except json.JSONDecodeError:  # MLflow's 504 is plain text
            return error.code, {"message": text.decode()}


# The official ISIC 2018 scorer, run as its command line (it still calls pandas' applymap).
ISIC_SCORER = ("import pandas; pandas.DataFrame.applymap = pandas.DataFrame.map; "
               "from isic_challenge_scoring.__main__ import cli; cli()")


# --- a logged model -----------------------------------------------------------------

@dataclass(frozen=True)
class LoggedModel:
    """An untrained resnext_small at 32 px (frame 40x53), logged as skinml logs every model
    into a store of its own: for tests about packaging and scoring, not accuracy."""

    model_uri: str
    tracking_uri: str

    @property
    def root(self) -> Path:
        """The store's folder: `isolated_tracking(root)` makes it the active store."""
        return Path(self.tracking_uri.removeprefix("sqlite:///")).parent


def log_tiny_model(root: Path, temperature: float = 1.0, image_size: int = 32) -> LoggedModel:
    """An untrained resnext_small logged into a store of its own (at 96 px: the demo's size,
    a forward pass long enough to be interrupted in)."""
    import torch

    from skinml.core.config import ModelConfig
    from skinml.models import build_model
    from skinml.tracking.logged_model import log_model, model_meta

    root.mkdir(parents=True, exist_ok=True)
    frame = (40, 53) if image_size == 32 else (image_size * 4 // 3, image_size * 16 // 9)
    with isolated_tracking(root) as uri:
        torch.manual_seed(0)
        config = ModelConfig(arch="resnext_small", image_size=image_size, crop_pct=0.875)
        with mlflow.start_run():
            info = log_model(build_model(config).state_dict(),
                             model_meta(config, frame, temperature), str(SAMPLE_IMAGES[0]))
    return LoggedModel(info.model_uri, uri)


TEMPERATURE = 2.5  # of `logged_model`


@pytest.fixture(scope="session")
def logged_model(tmp_path_factory: pytest.TempPathFactory):
    """A resnext_small at 32 px with a temperature, logged and loaded (an MLflow PyFuncModel)
    as skinml logs every model: for the served model's tests, not accuracy."""
    from skinml.tracking.logged_model import load_model

    root = tmp_path_factory.mktemp("logged-model")
    logged = log_tiny_model(root, TEMPERATURE)
    with isolated_tracking(root):
        return load_model(logged.model_uri)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoggedModel:
    """log_tiny_model once per test process, for the modules that score with it (the
    scoring, Spark and bench-predict tests). They may register it and read it, never log
    into its store."""
    return log_tiny_model(tmp_path_factory.mktemp("tiny-model"))


# --- the skinml command ----------------------------------------------------------------

def skinml(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `skinml` entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "skinml", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def skinml_in_process(*args: str, cwd: Path | None = None,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process, for tests of what a command does rather than of its process
    (signals, exit, imports): a fresh interpreter costs ~5-7 CPU-seconds of imports."""
    from click.testing import CliRunner

    from skinml.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI's basicConfig(force=True) drops them
    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        try:
            result = CliRunner().invoke(main, list(args))
        finally:
            root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


# --- trained runs in an isolated store -------------------------------------------------

@dataclass
class Store:
    """A tracking store in `root` with trained runs (and what was registered from them)."""

    uri: str
    root: Path
    folder: Path | None  # the data they trained on (None: the bundled sample)
    runs: list[TrainResult]
    registrations: list[Registration] = field(default_factory=list)

    @property
    def ranked(self) -> list[TrainResult]:
        """The runs, the best validation score first (as selection reads them)."""
        return sorted(self.runs, key=lambda r: -r.val_balanced_accuracy)

    @contextlib.contextmanager
    def active(self) -> Iterator[str]:
        """This store as the process's tracking store, its root as the working dir."""
        with isolated_tracking(self.root) as uri:
            yield uri

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """`skinml ...` in a fresh interpreter, tracking into this store."""
        return skinml(*args, cwd=self.root, timeout=timeout,
                      env={"MLFLOW_TRACKING_URI": self.uri, **(env or {})})

    def cli_in_process(self, *args: str) -> subprocess.CompletedProcess:
        """`skinml ...` in this process, tracking into this store."""
        return skinml_in_process(*args, cwd=self.root, env={"MLFLOW_TRACKING_URI": self.uri})


@contextlib.contextmanager
def trained_store(root: Path, runs: Sequence[Sequence[str]], lesions_per_class: int | None = 5,
                  register_best: bool = False) -> Iterator[Store]:
    """A fresh store in `root` with one tiny training run per overrides list, on a real
    folder of `lesions_per_class` lesions per class (None: the bundled sample); with
    `register_best` the run with the best validation score is registered (champion)."""
    from skinml.training.choices import load_run_config
    from skinml.workflows.registry import register_run
    from skinml.workflows.train import train

    with isolated_tracking(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        folder = (build_folder(root / "ham", lesions_per_class=lesions_per_class)
                  if lesions_per_class else None)
        store = Store(uri, root, folder,
                      [train(load_run_config(DEMO, tiny(folder, *extra))) for extra in runs])
        if register_best:
            store.registrations.append(register_run(store.ranked[0].run_id))
        yield store


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Two tiny runs (seeds 0 and 1) on one split of a 5-lesions-per-class folder, the one
    with the better validation score registered as champion.

    Trained once per test process and shared by its modules: a test may register further
    versions (the gate keeps an equal model out) and log runs into other experiments; it
    never moves the champion or trains into `skin-lesion`. Use it through `demo`.
    """
    with trained_store(tmp_path_factory.mktemp("demo-store"),
                       [["runtime.seed=0"], ["runtime.seed=1"]], register_best=True) as store:
        pass
    return store


@pytest.fixture
def demo(demo_store: Store) -> Iterator[Store]:
    """The shared demo store, active (tracking URI and working dir) for one test."""
    with demo_store.active():
        yield demo_store


@contextlib.contextmanager
def served(model_uri: str, store: Store, **options) -> Iterator[str]:
    """`mlflow models serve` (or, with mlserver=True, MLServer) of `model_uri` from `store`
    on a free 127.0.0.1 port; yields its URL and stops the server by PID."""
    from skinml.serving.ports import free_port
    from skinml.serving.server import start_server, stop_server, wait_ready

    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store.uri)
        process = start_server(model_uri, port, log_path=store.root / f"server-{port}.log",
                               **options)
    try:
        wait_ready(process, port, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


@pytest.fixture(scope="session")
def champion_server(demo_store: Store) -> Iterator[str]:
    """`mlflow models serve` of the demo store's champion."""
    with served(f"models:/{NAME}@champion", demo_store) as url:
        yield url


# --- markers ---------------------------------------------------------------------------

def cuda_test(function: Callable) -> Callable:
    """Marked `gpu`, and skipped with the reason on a machine without CUDA."""
    import torch

    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                    reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    return pytest.mark.gpu(needs_cuda(function))


# --- PostgreSQL ------------------------------------------------------------------------

PG = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def postgres() -> Iterator[list[str]]:
    """Two fresh databases on the PostgreSQL at 127.0.0.1:5432, dropped afterwards; the test
    is skipped, with the reason, when no server answers there."""
    import psycopg

    names = [f"skinml_test_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                                autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({str(exc).strip().splitlines()[0]})")
    with admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield [f"{PG}/{name}" for name in names]
        finally:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# How the suite is spread over xdist workers, and its durations recorded: tests/scheduling.py
# (pytest finds hooks by name in this module).
from .scheduling import (  # noqa: E402
    pytest_addoption,
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_xdist_auto_num_workers,
)

__all__ = ["pytest_addoption", "pytest_collection_finish", "pytest_collection_modifyitems",
           "pytest_runtest_logreport", "pytest_sessionfinish", "pytest_xdist_auto_num_workers"]
