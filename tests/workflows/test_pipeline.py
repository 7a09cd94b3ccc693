"""`skinml pipeline`: study, cross-validation of the best configuration, the fold ensemble
registered through the gate, one report; one parent run; killed in each stage and continued
from it, nothing finished done twice. One scenario, begun with `mlflow run . -e pipeline`
(a whole pipeline costs ~40 s of a 2-core machine: the suite runs one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from skinml.workflows.pipeline import PipelineOptions, run_pipeline

from ..conftest import REPO, tiny

pytestmark = pytest.mark.slow  # a whole pipeline: ~60 s on 2 cores

SETTINGS = tiny(None, "optim.epochs=1")


def pipeline_runs(tracking_uri: str, pipeline_id: str) -> dict[str, list]:
    """The runs nested under a pipeline run, by role."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_run(pipeline_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{pipeline_id}'")
    roles: dict[str, list] = {}
    for run in runs:
        roles.setdefault(run.data.tags["skinml.role"], []).append(run)
    return roles


def start(tmp_path: Path, tracking: str, log: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "skinml", "pipeline", *args]
    return subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking,
                                 "OMP_NUM_THREADS": "1"})


def kill_when(process: subprocess.Popen, log: Path, *lines: str) -> str:
    """SIGKILL `process` once its log shows every one of `lines`; the log."""
    deadline = time.monotonic() + 300
    while not all(line in log.read_text() for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return log.read_text()


def mlflow_run_pipeline(tmp_path: Path, tracking: str, log: str,
                        storage: str) -> subprocess.Popen:
    """`mlflow run . -e pipeline` with every parameter the entry point passes on."""
    command = ["mlflow", "run", str(REPO), "-e", "pipeline", "--env-manager", "local",
               "--experiment-name", "skin-lesion", "-P", "n_trials=2", "-P", "folds=2",
               "-P", f"storage={storage}", "-P", "study_name=piped", "-P", "workers=1",
               "-P", f"overrides={' '.join(SETTINGS)}"]
    return subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking,
                                 "OMP_NUM_THREADS": "1"})


def test_a_pipeline_killed_in_each_stage_continues_from_it(tracking, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    text = kill_when(mlflow_run_pipeline(tmp_path, tracking, "1.log", storage),
                     tmp_path / "1.log", "pipeline stage 1/4", "epoch 1/1")  # its first trial
    pipeline_id = text.split("skinml pipeline --resume ")[1].split()[0]
    kill_when(start(tmp_path, tracking, "2.log", "--resume", pipeline_id), tmp_path / "2.log",
              "pipeline stage 2/4", "fold 1 of 2")
    kill_when(start(tmp_path, tracking, "3.log", "--resume", pipeline_id), tmp_path / "3.log",
              "pipeline stage 3/4")
    third = (tmp_path / "3.log").read_text()
    assert "pipeline stage 1/4" not in third  # the finished study is not run again
    assert "continuing run" in third  # the killed cross-validation goes on

    result = run_pipeline(PipelineOptions(), resume_run_id=pipeline_id)  # the options it began with
    assert result.run_id == pipeline_id
    client = mlflow.MlflowClient()
    run = client.get_run(pipeline_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["skinml.pipeline.stage"] == "done"
    roles = pipeline_runs(tracking, pipeline_id)
    # the study: killed once, continued once; its trials complete exactly once each
    assert sorted(r.info.status for r in roles["study"]) == ["FINISHED", "KILLED"]
    (finished,) = [r for r in roles["study"] if r.info.status == "FINISHED"]
    assert finished.info.run_id == tags["skinml.pipeline.study_run"]
    study = optuna.load_study(study_name="piped", storage=storage)
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2
    # one cross-validation, continued after its kill: two finished folds
    (cv_run,) = roles["cv"]
    assert cv_run.info.run_id == tags["skinml.pipeline.cv_run"]
    assert client.get_run(cv_run.info.run_id).info.status == "FINISHED"
    folds = client.search_runs([cv_run.info.experiment_id],
                               f"tags.`skinml.cv_parent` = '{cv_run.info.run_id}'")
    assert sorted(f.data.tags["skinml.cv_fold"] for f in folds
                  if f.info.status == "FINISHED") == ["0", "1"]
    # the cross-validation is of the best trial's configuration
    assert tags["skinml.pipeline.best_run"] == study.best_trial.user_attrs["mlflow_run_id"]
    for key, value in study.best_trial.params.items():
        assert cv_run.data.params[key] == str(value)
    # the fold ensemble, registered once however the kill fell in the registration
    versions = client.search_model_versions(f"run_id = '{cv_run.info.run_id}'")
    (version,) = versions
    assert tags["skinml.pipeline.model_version"] == f"skin-lesion-classifier/{version.version}"
    assert version.tags["gate.decision"] == "first champion"  # the gate finished, once
    assert client.get_model_version_by_alias("skin-lesion-classifier",
                                             "champion").version == version.version
    # the report: three models on the same test images, each pair with its interval
    m = run.data.metrics
    for key in ("test_balanced_accuracy_base", "test_balanced_accuracy_trial",
                "test_balanced_accuracy_ensemble", "delta_balanced_accuracy_trial_vs_base",
                "delta_balanced_accuracy_ensemble_vs_base",
                "delta_balanced_accuracy_ensemble_vs_trial"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
    assert m["delta_balanced_accuracy_ensemble_vs_base"] == pytest.approx(
        m["test_balanced_accuracy_ensemble"] - m["test_balanced_accuracy_base"])
    assert result.report.test["fold ensemble"].value == pytest.approx(
        m["test_balanced_accuracy_ensemble"])
    text = Path(client.download_artifacts(pipeline_id, "pipeline_report.md")).read_text()
    assert "99 images / 66 lesions" in text and "reported, never used to choose" in text
