"""Tuning on the cross-validation mean (`skinml tune --objective cv`): each trial a CV parent
nested under the study's run, the running mean of its folds reported for pruning."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from skinml.training.checkpoint import checkpoint_path
from skinml.workflows.cv import PARENT_TAG
from skinml.workflows.tuning import trials
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.study import tune
from skinml.workflows.tuning.trials import RUN_ID_ATTR

from ...conftest import build_folder, tiny
from .conftest import tuning_options

pytestmark = pytest.mark.slow  # every trial a cross-validation: 7-40 s each

FOLDS = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_folder(tmp_path_factory.mktemp("tune-cv") / "ham", lesions_per_class=5)


def options(tmp_path: Path, data: Path, **changes) -> TuneOptions:
    """A 2-trial study on the CV mean of 2 folds, 1-epoch runs, one searched key."""
    space = tmp_path / "space.yaml"
    space.write_text("augment.rotation: {type: float, low: 0.0, high: 180.0}\n")
    return tuning_options(tmp_path, data, **{
        "search_space": space, "n_trials": 2, "study_name": "cv-study", "objective": "cv",
        "folds": FOLDS, "pruner": None, "overrides": tuple(tiny(data, "optim.epochs=1")),
        **changes})


def fold_runs(parent_id: str) -> list:
    parent = MlflowClient().get_run(parent_id)
    runs = MlflowClient().search_runs([parent.info.experiment_id],
                                      f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return sorted(runs, key=lambda r: int(r.data.tags["skinml.cv_fold"]))


def test_each_trial_is_a_cv_parent_under_the_study_reporting_the_running_fold_mean(
        tracking, tmp_path, folder, caplog):
    result = tune(options(tmp_path, folder, verdict=True))
    small = [r for r in caplog.records if "validation folds hold fewer" in r.getMessage()]
    assert len(small) == 1  # 5 lesions a class in 2 folds: warned once, not once a trial
    study = optuna.load_study(study_name="cv-study", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        cv_run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert cv_run.data.tags["skinml.role"] == "cv"
        assert cv_run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert cv_run.data.tags["optuna.trial_state"] == "COMPLETE"
        folds = fold_runs(cv_run.info.run_id)
        assert len(folds) == FOLDS
        assert all(f.data.tags["mlflow.parentRunId"] == cv_run.info.run_id for f in folds)
        scores = [f.data.metrics["best_val_balanced_accuracy"] for f in folds]
        # after fold k: the mean of folds 1..k; the trial's value: the mean of all folds
        assert trial.intermediate_values == pytest.approx(
            {k: float(np.mean(scores[:k])) for k in range(1, FOLDS + 1)})
        m = cv_run.data.metrics
        assert trial.value == pytest.approx(m["fold_val_balanced_accuracy_mean"])
        assert m["fold_val_balanced_accuracy_mean_ci_low"] <= trial.value <= \
            m["fold_val_balanced_accuracy_mean_ci_high"]
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.params["tune.objective"] == "cv"
    assert parent.data.params["tune.pruner"] == "median"  # the cv default
    assert parent.data.params["tune.pruner_warmup"] == "2"  # folds
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.parent_run_id)}
    assert {"trial_intervals.png", "intermediate_values.png"} <= artifacts
    # the verdict's baseline is the base config cross-validated the same way
    (baseline,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list",
                                     filter_string="tags.`skinml.role` = 'baseline'")
    assert baseline.data.params["cv.folds"] == str(FOLDS)
    assert len(fold_runs(baseline.info.run_id)) == FOLDS
    assert parent.data.tags["skinml.verdict"].startswith(
        f"best trial {study.best_trial.number} vs base config")


def test_a_trial_pruned_after_its_first_fold_trains_no_more_folds(tracking, tmp_path, folder,
                                                                   monkeypatch):
    def prune_after_first(trial, folds):
        def report(done, running_mean):
            trial.report(running_mean, done)
            raise optuna.TrialPruned(f"pruned after fold {done} of {folds}")
        return report

    monkeypatch.setattr(trials, "_fold_reporter", prune_after_first)
    result = tune(options(tmp_path, folder, n_trials=1, max_trials=1, study_name="pruned"))
    assert result.counts == {"COMPLETE": 0, "PRUNED": 1, "FAIL": 0}
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    cv_run = mlflow.get_run(study.trials[0].user_attrs[RUN_ID_ATTR])
    assert cv_run.info.status == "KILLED"
    assert cv_run.data.tags["optuna.trial_state"] == "PRUNED"
    assert len(fold_runs(cv_run.info.run_id)) == 1
    assert "fold_val_balanced_accuracy_mean" not in cv_run.data.metrics
    metrics = mlflow.get_run(result.parent_run_id).data.metrics
    assert metrics["pruned_epochs_saved"] == (FOLDS - 1) * 1  # the folds not run, one epoch each



def test_an_interrupted_trial_stays_killed_and_leaves_no_checkpoint(tracking, tmp_path,
                                                                    monkeypatch):
    options = tuning_options(tmp_path, tmp_path)
    config = trials.load_run_config(options.config, list(options.overrides))
    checkpoint = checkpoint_path(config, "0" * 32)

    def interrupted_in_training(config, options, data, tags, trial, on_run_start, **_):
        client = MlflowClient()  # a run standing in for the trial's training run
        run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
        on_run_start(run.info.run_id)
        client.set_terminated(run.info.run_id, status="KILLED")  # as Ctrl-C ends it
        checkpoint.parent.parent.joinpath(run.info.run_id).mkdir(parents=True)
        checkpoint.parent.parent.joinpath(run.info.run_id, "last.pt").write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(trials, "fit_config", interrupted_in_training)
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(KeyboardInterrupt):
        trials.run_trial(trial, options, (), data=None)
    run_id = trial.user_attrs[RUN_ID_ATTR]
    assert mlflow.get_run(run_id).info.status == "KILLED"  # not FAILED: it was stopped
    assert "optuna.trial_state" not in mlflow.get_run(run_id).data.tags
    assert not checkpoint.parent.parent.joinpath(run_id).exists()  # a trial never resumes
