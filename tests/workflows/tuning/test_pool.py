"""`skinml tune --workers N`: worker processes of one study on one machine, their trials
nested under the one study run, Ctrl-C and the command again, a worker that dies (one
scenario: each `--workers 2` command starts three interpreters, ~7 s of imports each)."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from skinml.core.config import Config
from skinml.data.cache import cache_root
from skinml.workflows.tuning.pool import placements
from skinml.workflows.tuning.trials import RUN_ID_ATTR
from skinml.workflows.tuning.workers import WORKER_ATTR

from .conftest import running_trial, worker


def trials_of(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials (none before its process has created it)."""
    try:
        return optuna.load_study(study_name="shared", storage=storage).get_trials()
    except KeyError:
        return []


def study_runs(tracking_uri: str) -> tuple[list, dict]:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("skin-lesion")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("skinml.role") == "study"]
    return parents, {r.info.run_id: r for r in runs if "optuna.trial_number" in r.data.tags}


def test_the_cores_are_split_between_workers_on_a_cpu():
    config = Config()
    one = placements(1, config)
    assert len(placements(3, config)) == 3
    assert placements(3, config)[0][1] == max(1, one[0][1] // 3)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_the_command_again_completes_the_study_despite_a_dead_worker(
        tmp_path, synthetic, tracking):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = worker(tmp_path, synthetic, storage, tracking, 4, "first.log", "--workers=2",
                   "--set=optim.epochs=2")
    deadline = time.monotonic() + 240
    while not any(t.state == TrialState.COMPLETE for t in trials_of(storage)) \
            or not any(t.state == TrialState.RUNNING for t in trials_of(storage)):
        assert first.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the study's process group
    assert first.wait(timeout=120) == 130
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "continues the study" in log.strip().splitlines()[-1], log[-2000:]
    parents, runs = study_runs(tracking)
    assert all(r.info.status != "RUNNING" for r in [*parents, *runs.values()])

    again = worker(tmp_path, synthetic, storage, tracking, 4, "again.log", "--workers=2",
                   "--set=optim.epochs=2")
    # a worker that dies (SIGKILL: no handler runs) fails only its own trial
    before = {t.number for t in trials_of(storage)}
    doomed = running_trial(again, tmp_path / "again.log", storage, exclude=before)
    os.kill(int(doomed.user_attrs[WORKER_ATTR].rsplit(":", 1)[1]), signal.SIGKILL)
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    trials = trials_of(storage)
    assert trials[doomed.number].state == TrialState.FAIL
    doomed_run = mlflow.MlflowClient(tracking).get_run(doomed.user_attrs[RUN_ID_ATTR])
    assert doomed_run.info.status == "FAILED"
    assert doomed_run.data.tags["optuna.trial_state"] == "FAIL"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # none lost, none duplicated
    assert len({t.user_attrs[RUN_ID_ATTR] for t in complete}) == 4
    # two processes ran trials (a trial the Ctrl-C stopped before it named its worker has
    # no name, and which workers took the second run's trials is up to timing)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials if WORKER_ATTR in t.user_attrs}) >= 2
    parents, runs = study_runs(tracking)
    assert len(parents) == 2  # one study run per command, every trial nested under one
    # a trial the Ctrl-C stopped before its MLflow run started has no run to nest
    assert {runs[t.user_attrs[RUN_ID_ATTR]].data.tags["mlflow.parentRunId"]
            for t in trials if RUN_ID_ATTR in t.user_attrs} <= {p.info.run_id for p in parents}
    assert {runs[t.user_attrs[RUN_ID_ATTR]].info.status for t in complete} == {"FINISHED"}
    best = max(complete, key=lambda t: t.value)
    assert runs[best.user_attrs[RUN_ID_ATTR]].outputs.model_outputs
    assert list((cache_root() / "checkpoints").glob("*/*.pt")) == []
