"""What the tuning tests share: a synthetic folder, study options, worker processes and
the runs a study logged."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from skinml.data.synth import write_synthetic
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.study import tune
from skinml.workflows.tuning.trials import RUN_ID_ATTR

from ...conftest import DEMO, SEARCH_SPACE, tiny


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """300 synthetic images at 48x36: a study's data, made once per test process (in this
    process: a pool's two fresh interpreters took 3 s for what one draws in 0.3 s)."""
    out = tmp_path_factory.mktemp("tune-data") / "ham"
    return write_synthetic(out, 300, seed=0, width=48, height=36, progress=False, workers=1)


def tuning_options(tmp_path: Path, data: Path, **changes) -> TuneOptions:
    """A 4-trial study of 2-epoch tiny runs in `tmp_path`, no pruning, no verdict."""
    base = dict(config=DEMO, search_space=SEARCH_SPACE, n_trials=4, study_name="study",
                storage=f"sqlite:///{tmp_path / 'optuna.db'}", pruner="none", verdict=False,
                overrides=tuple(tiny(data)))
    return TuneOptions(**{**base, **changes})


def runs_of(study_name: str) -> tuple[list, list]:
    runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("optuna.study_name") == study_name
               and r.data.tags.get("skinml.role") == "study"]
    children = [r for r in runs if r.data.tags.get("optuna.study_name") == study_name
                and "optuna.trial_number" in r.data.tags]
    return parents, children


def tune_in_thread(opts: TuneOptions, within: float):
    """`tune(opts)`, failing the test if it has not returned `within` seconds later (the
    thread is a daemon, so a study that waits for ever does not hold the test run)."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(tune(opts)), daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"the study was still waiting after {within:.0f} s"
    assert outcome, "tune raised (see the thread's traceback above)"
    return outcome[0]


def worker(tmp_path: Path, data: Path, storage: str, tracking_uri: str, n_trials: int,
           log: str, *extra: str) -> subprocess.Popen:
    """A `skinml tune` process; one torch thread each, as two share this 2-core machine."""
    command = [sys.executable, "-m", "skinml", "tune", "--config", str(DEMO),
               "--search-space", str(SEARCH_SPACE), "--study-name", "shared", "--storage", storage,
               "--n-trials", str(n_trials), "--pruner", "none", "--verdict", "false",
               "--heartbeat-interval", "1",
               "--grace-period", "4", *[f"--set={o}" for o in tiny(data, "optim.epochs=1")],
               *extra]
    return subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                 "OMP_NUM_THREADS": "1"})


def running_trial(process: subprocess.Popen, log: Path, storage: str,
                  exclude: Collection[int] = ()) -> optuna.trial.FrozenTrial:
    """The first trial `process` runs (numbered outside `exclude`), once it has an MLflow
    run: Optuna's heartbeat thread is then beating (a trial without a heartbeat never goes
    stale; Optuna skips those)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            continue
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                   if RUN_ID_ATTR in t.user_attrs and t.number not in exclude]
        if running:
            return running[0]
    raise AssertionError(f"no trial started in 180 s: {log.read_text()[-3000:]}")
