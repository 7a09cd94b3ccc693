"""A real 3-fold cross-validation on tiny images: nested fold runs, out-of-fold predictions
and metrics, the fold ensemble served by `mlflow models serve`, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from skinml.core.config import load_config
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data import load_ham10000
from skinml.data.split import split_by_lesion
from skinml.evaluation.metrics import balanced_accuracy, fold_mean_balanced_accuracy, macro_auc
from skinml.serving.server import DIRECT, running_server
from skinml.tracking.logged_model import predict_paths, reads_clinical
from skinml.tracking.reader import logged_model_uri
from skinml.workflows.cv import FOLD_TAG, PARENT_TAG, cross_validate
from skinml.workflows.model_card import card_file
from skinml.workflows.registry import register_run

from ..conftest import (
    DEMO,
    b64,
    build_folder,
    isolated_tracking,
    refused_statements,
    skinml_in_process,
    tiny,
)

FOLDS = 3


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """One uninterrupted 3-fold cross-validation in its own tracking store (14-23 s: the
    tests that use it are marked slow)."""
    root = tmp_path_factory.mktemp("cv")
    with isolated_tracking(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        folder = build_folder(root / "ham", lesions_per_class=5)
        overrides = tiny(folder, "optim.epochs=1")
        with refused_statements() as refused:
            result = cross_validate(load_config(DEMO, overrides), FOLDS)
        yield {"uri": uri, "root": root, "overrides": overrides, "result": result,
               "refused": refused}


def children(parent_id: str) -> list:
    parent = MlflowClient().get_run(parent_id)
    return MlflowClient().search_runs([parent.info.experiment_id],
                                      f"tags.`{PARENT_TAG}` = '{parent_id}'")


@pytest.mark.slow  # the cv fixture
def test_one_parent_run_with_one_nested_training_run_per_fold(cv):
    result = cv["result"]
    parent = mlflow.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["skinml.role"] == "cv" and parent.data.params["cv.folds"] == "3"
    runs = children(result.run_id)
    assert sorted(int(r.data.tags[FOLD_TAG]) for r in runs) == [0, 1, 2]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.data.tags["skinml.role"] == "training" and run.outputs.model_outputs
    for metric in ("oof_balanced_accuracy_ci_low", "oof_auc", "test_balanced_accuracy",
                   "fold_val_balanced_accuracy_mean", "fold_val_balanced_accuracy_sd"):
        assert metric in parent.data.metrics, metric
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"oof_predictions.csv", "cv_folds.png", "confusion_matrix.png", "oof",
            "split.csv"} <= artifacts
    oof_files = {a.path for a in MlflowClient().list_artifacts(result.run_id, "oof")}
    assert {"oof/confusion_matrix_normalized.png", "oof/classification_report.txt"} <= oof_files
    assert cv["refused"] == []  # the parent's and folds' models logged before their metrics


@pytest.mark.slow  # the cv fixture
def test_oof_predictions_cover_every_non_test_image_once_and_give_the_parent_metrics(cv):
    run_id = cv["result"].run_id
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                          artifact_path="oof_predictions.csv"))
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                            artifact_path="split.csv"))
    assert sorted(oof["image_id"]) == sorted(split.loc[split["split"] != "test", "image_id"])
    assert oof.groupby("lesion_id")["fold"].nunique().max() == 1
    metrics = mlflow.get_run(run_id).data.metrics
    labels, probs = oof["label"].to_numpy(), oof[list(PROBABILITY_COLUMNS)].to_numpy()
    assert metrics["oof_balanced_accuracy"] == pytest.approx(balanced_accuracy(labels, probs),
                                                             abs=1e-9)
    assert metrics["oof_auc"] == pytest.approx(macro_auc(labels, probs), abs=1e-6)
    assert metrics["best_val_balanced_accuracy"] == metrics["oof_balanced_accuracy"]
    # the mean of the folds (what `tune --objective cv` optimises) with its lesion interval
    folds = oof["fold"].to_numpy()
    assert metrics["fold_val_balanced_accuracy_mean"] == pytest.approx(
        fold_mean_balanced_accuracy(labels, probs, folds), abs=1e-9)
    assert (metrics["fold_val_balanced_accuracy_mean_ci_low"]
            <= metrics["fold_val_balanced_accuracy_mean"]
            <= metrics["fold_val_balanced_accuracy_mean_ci_high"])


@pytest.mark.slow  # the cv fixture
def test_served_ensemble_is_the_mean_of_the_fold_models(cv):
    paths = sorted((cv["root"] / "ham").rglob("*.jpg"))[:6]
    fold_probs = np.mean([predict_paths(mlflow.pyfunc.load_model(logged_model_uri(r.info.run_id)),
                                        [str(p) for p in paths])
                          for r in children(cv["result"].run_id)], axis=0)
    payload = {"inputs": {"image": [b64(p) for p in paths]}}
    with running_server(cv["result"].model_uri) as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with DIRECT.open(request, timeout=60) as reply:
            served = pd.DataFrame(json.loads(reply.read())["predictions"])
    np.testing.assert_allclose(served[list(PROBABILITY_COLUMNS)], fold_probs, atol=1e-6)


@pytest.mark.slow  # the cv fixture
def test_the_parent_registers_like_any_run_with_its_model_card(cv):
    registration = register_run(cv["result"].run_id, name="cv-ensemble")
    assert registration.champion  # the first version of a new name
    card = Path(mlflow.artifacts.download_artifacts(
        f"models:/cv-ensemble/{registration.version}/{card_file(registration.version)}")
    ).read_text()
    assert "each fold's own" in card


@pytest.mark.parametrize("command", [["cv"], ["tune", "--objective", "cv"]])
def test_more_folds_than_a_class_has_lesions_is_refused_before_any_run(tracking, tmp_path,
                                                                       command):
    storage = tmp_path / "optuna.db"
    if command[0] == "tune":  # refused before the study exists, not once per trial
        command = [*command, "--storage", f"sqlite:///{storage}"]
    data = load_config(DEMO).data
    frame = load_ham10000()
    split = split_by_lesion(frame, val_frac=data.val_frac, test_frac=data.test_frac,
                            seed=data.split_seed)
    lesions = frame[split != "test"].groupby("dx")["lesion_id"].nunique()
    fewest, dx = lesions.min(), lesions.idxmin()
    result = skinml_in_process(*command, "--config", str(DEMO), "--folds", str(fewest + 1),
                               *[f"--set={o}" for o in tiny(None)])
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: --folds {fewest + 1}: class {dx} has only {fewest} lesions outside the test "
        f"split; at most {fewest} folds")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not storage.exists()


@pytest.mark.slow
def test_a_cv_killed_in_its_second_fold_resumes_to_the_uninterrupted_result(cv):
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv["uri"], "SKINML_CACHE":
           str(cv["root"] / "cache")}
    experiment = MlflowClient().get_experiment_by_name("skin-lesion").experiment_id
    before = {r.info.run_id for r in MlflowClient().search_runs([experiment])}
    process = subprocess.Popen(
        [sys.executable, "-m", "skinml", "cv", "--config", str(DEMO), "--folds", str(FOLDS),
         *[f"--set={o}" for o in cv["overrides"]]], env=env, cwd=cv["root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parent_id, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once the second fold's run has started
        assert process.poll() is None, "cross-validation ended before it could be killed"
        new = [r for r in MlflowClient().search_runs([experiment])
               if r.info.run_id not in before]
        second = [r for r in new if r.data.tags.get(FOLD_TAG) == "1"]
        if second:
            parent_id = second[0].data.tags[PARENT_TAG]
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert mlflow.get_run(parent_id).info.status == "RUNNING"  # killed, not finished

    killed = next(r.info.run_id for r in children(parent_id) if r.data.tags[FOLD_TAG] == "1")
    checkpoint = cv["root"] / "cache" / "checkpoints" / killed / "last.pt"  # SKINML_CACHE
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"epoch 1")  # what an epoch of the killed fold may have left

    # `skinml cv --resume`, as a user continues it: a new process, no experiment chosen
    resumed = subprocess.run([sys.executable, "-m", "skinml", "cv", "--resume", parent_id],
                             env=env, cwd=cv["root"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = next(r.info.run_id for r in children(parent_id) if r.data.tags[FOLD_TAG] == "0")
    assert (f"resuming cross-validation {parent_id}: keeping fold 1 (run {kept}); "
            f"starting with fold 2 of {FOLDS}") in resumed.stderr
    # every fold run, the new ones too, is filed in the parent's experiment
    everywhere = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    assert {r.info.experiment_id for r in everywhere} == {experiment}
    assert f"#/experiments/{experiment}/runs/" in resumed.stderr
    assert not checkpoint.exists()  # the killed fold trains in a new run: its checkpoint goes
    uninterrupted = cv["result"]
    metrics = mlflow.get_run(parent_id).data.metrics
    for split, scores in (("oof", uninterrupted.oof), ("test", uninterrupted.test)):
        finite = {k: v for k, v in scores.items() if np.isfinite(v)}  # NaN is not logged
        assert {k: metrics[f"{split}_{k}"] for k in finite} == finite
    states = sorted((r.data.tags[FOLD_TAG], r.info.status) for r in children(parent_id))
    assert states == [("0", "FINISHED"), ("1", "FINISHED"), ("1", "KILLED"), ("2", "FINISHED")]
    assert mlflow.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow  # a 2-fold fusion cross-validation: 9-15 s
def test_a_fusion_cv_ensemble_reads_metadata_like_its_folds(tmp_path):
    """model.metadata=concat: every fold model and the parent's fold ensemble take age, sex
    and body site; the ensemble is the mean of its folds with the metadata too."""
    with isolated_tracking(tmp_path), pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(tmp_path / "cache"))
        folder = build_folder(tmp_path / "ham", lesions_per_class=4)
        result = cross_validate(load_config(DEMO, tiny(folder, "optim.epochs=1",
                                                       "model.metadata=concat")), 2)
        frame = load_ham10000(folder).iloc[:5]
        paths = frame["path"].tolist()
        folds = [mlflow.pyfunc.load_model(logged_model_uri(r.info.run_id))
                 for r in children(result.run_id)]
        ensemble = mlflow.pyfunc.load_model(result.model_uri)
        assert all(reads_clinical(model) for model in [*folds, ensemble])
        mean = np.mean([predict_paths(m, paths, clinical=frame) for m in folds], axis=0)
        np.testing.assert_allclose(predict_paths(ensemble, paths, clinical=frame), mean,
                                   atol=1e-6)
        assert not np.allclose(predict_paths(ensemble, paths), mean)  # metadata matters
