"""Several workers share one study through PostgreSQL: n_trials counts COMPLETE trials over
all of them, a killed worker's trial fails and is retried, a stalled one goes on, and
--timeout bounds a worker's wait for another's trial."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from skinml.workflows.tuning.trials import RUN_ID_ATTR
from skinml.workflows.tuning.workers import open_study

from .conftest import running_trial, tune_in_thread, tuning_options, worker

pytestmark = pytest.mark.slow  # worker processes: 5-40 s each


def test_two_workers_on_postgres_share_one_study(tmp_path, synthetic, postgres):
    storage, tracking_uri = postgres
    workers = [worker(tmp_path, synthetic, storage, tracking_uri, 4, f"w{i}.log",
                      f"--seed={i}") for i in range(2)]
    for i, process in enumerate(workers):
        code = process.wait(timeout=600)
        log = (tmp_path / f"w{i}.log").read_text()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("skin-lesion")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("skinml.role") == "study"]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(parents) == 2
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == sorted(
        t.number for t in trials if RUN_ID_ATTR in t.user_attrs)
    assert {t.user_attrs[RUN_ID_ATTR] for t in complete} <= {c.info.run_id for c in children}


def test_a_killed_workers_trial_fails_and_a_stalled_workers_trial_is_declared_dead(
        tmp_path, synthetic, postgres):
    """A killed worker's trial goes stale and fails. A worker stopped longer than the grace
    period is alive: the other worker fails and retries its trial, and the stalled one says
    so in one line and exits 0 (Optuna alone ends it with "Cannot tell a FAIL trial")."""
    storage, tracking_uri = postgres
    doomed = worker(tmp_path, synthetic, storage, tracking_uri, 2, "doomed.log",
                    "--set=optim.epochs=20")  # a long trial to be killed in
    killed = running_trial(doomed, tmp_path / "doomed.log", storage)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    slow = worker(tmp_path, synthetic, storage, tracking_uri, 2, "slow.log",
                  "--set=optim.epochs=20", "--seed=2")
    stalled = running_trial(slow, tmp_path / "slow.log", storage, exclude={killed.number})
    os.killpg(slow.pid, signal.SIGSTOP)
    try:
        other = worker(tmp_path, synthetic, storage, tracking_uri, 2, "other.log", "--seed=1")
        deadline = time.monotonic() + 300
        study = optuna.load_study(study_name="shared", storage=storage)
        while study.get_trials()[stalled.number].state == TrialState.RUNNING:
            assert time.monotonic() < deadline and other.poll() is None, \
                (tmp_path / "other.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(slow.pid, signal.SIGCONT)
    for process, name in ((other, "other.log"), (slow, "slow.log")):
        code = process.wait(timeout=600)
        log = (tmp_path / name).read_text()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    log = (tmp_path / "slow.log").read_text()
    assert log.count(f"trial {stalled.number} was declared dead by another worker") == 1, log
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    assert trials[stalled.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    run = mlflow.MlflowClient(tracking_uri).get_run(stalled.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.trial_state"] == "FAIL"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # our ask() stands in for a worker
def test_a_worker_out_of_time_stops_waiting_for_another_workers_trial(tracking, tmp_path,
                                                                      synthetic):
    """--timeout bounds a worker's wait for a slot too, not only its own trials."""
    opts = tuning_options(tmp_path, synthetic, n_trials=1, study_name="busy", timeout=3,
                   heartbeat_interval=1, grace_period=60)
    study = open_study(opts)
    live = study.ask()  # another worker's trial, alive: its heartbeat goes on
    storage = optuna.storages.RDBStorage(opts.storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("busy"), live.number)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(0.5)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        result = tune_in_thread(opts, within=120)
    finally:
        stop.set()
        beating.join()
    assert result.counts["COMPLETE"] == 0
    trials = optuna.load_study(study_name="busy", storage=opts.storage).get_trials()
    assert trials[live.number].state == TrialState.RUNNING  # the other worker's, untouched
    waited = [t for t in trials if t.number != live.number]
    assert len(waited) == 1 and waited[0].state == TrialState.PRUNED
    assert waited[0].user_attrs["skinml.surplus"] is True
