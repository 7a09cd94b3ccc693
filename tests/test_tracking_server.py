"""A shared `mlflow server` (PostgreSQL backend, proxied artifacts) serves every workflow:
train, register, serve the champion through it, and tune with Optuna also on PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest

from skinml.serving.ports import free_port
from skinml.serving.server import DIRECT, start_server, stop_server, wait_ready
from skinml.training.choices import load_run_config
from skinml.workflows.registry import CHAMPION, register_run
from skinml.workflows.train import train
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.study import tune

from .conftest import DEMO, LEAKY_MLFLOW_VARIABLES, REPO, tiny

pytestmark = pytest.mark.slow  # a tracking server, a model server and a study: ~40 s


@pytest.fixture
def tracking_server(tmp_path, postgres, monkeypatch):
    """`mlflow server` on a free 127.0.0.1 port over a fresh database; stopped by PID.

    One worker process, and no job runner (MLflow's GenAI jobs, which skinml has none of):
    the default four workers and the runner's eight processes each import MLflow, which
    on 2 cores slowed the training that follows; the test's clients take turns anyway."""
    backend, optuna_db = postgres
    port = free_port()
    artifacts = tmp_path / "artifacts"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with DIRECT.open(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        work = tmp_path / "client"
        work.mkdir()
        monkeypatch.chdir(work)  # a client must not write ./mlruns or ./mlflow.db anywhere
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for leaky in LEAKY_MLFLOW_VARIABLES:
            monkeypatch.setenv(leaky, "")
            monkeypatch.delenv(leaky)
        mlflow.set_tracking_uri(url)
        yield {"url": url, "artifacts": artifacts, "optuna": optuna_db, "work": work}
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_train_register_serve_and_tune_through_the_server(tracking_server, make_folder):
    folder = make_folder("ham", lesions_per_class=5)
    result = train(load_run_config(DEMO, tiny(folder)))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    stored = {p.name for p in tracking_server["artifacts"].rglob("*") if p.is_file()}
    assert {"confusion_matrix.png", "split.csv", "MLmodel"} <= stored

    registration = register_run(result.run_id)
    assert registration.champion

    port = free_port()
    server = start_server(f"models:/skin-lesion-classifier@{CHAMPION}", port,
                          log_path=tracking_server["work"] / "serve.log")
    try:
        wait_ready(server, port)
        image = base64.b64encode(next(folder.glob("*.jpg")).read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with DIRECT.open(request, timeout=60) as reply:
            assert reply.status == 200
            assert json.loads(reply.read())["predictions"][0]["label"]
    finally:
        stop_server(server)

    outcome = tune(TuneOptions(config=DEMO, search_space=REPO / "experiments" /
                               "search_space.yaml", n_trials=2, study_name="shared",
                               verdict=False,
                               storage=tracking_server["optuna"], pruner="none",
                               overrides=tuple(tiny(folder, "optim.epochs=1"))))
    assert outcome.counts["COMPLETE"] == 2
    children = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list",
                                  filter_string="tags.`optuna.study_name` = 'shared'")
    assert len(children) == 3  # the parent and two trials
    assert not (tracking_server["work"] / "mlruns").exists()
    assert not (tracking_server["work"] / "mlflow.db").exists()
