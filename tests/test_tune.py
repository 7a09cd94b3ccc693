"""Tuning: a real Optuna study (SQLite file or the PostgreSQL at 127.0.0.1:5432), trials as
nested MLflow runs, pruning, resume, and several worker processes sharing one study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from skinml.data.synth import write_synthetic
from skinml.tune import RUN_ID_ATTR, TuneOptions, open_study, tune

from .conftest import tiny

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
SPACE = REPO / "experiments" / "search_space.yaml"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune-data") / "ham"
    return write_synthetic(out, 300, seed=0, width=48, height=36, progress=False)


def options(tmp_path: Path, data: Path, **changes) -> TuneOptions:
    base = dict(config=DEMO, search_space=SPACE, n_trials=4, study_name="study",
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


def test_a_study_is_one_parent_run_with_a_child_per_trial(tracking, tmp_path, synthetic):
    result = tune(options(tmp_path, synthetic, verdict=True))
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    (parent,), children = runs_of("study")
    assert parent.info.run_id == result.parent_run_id and parent.info.run_name == "study"
    assert parent.data.tags["optuna.storage"].startswith("sqlite:///")
    assert len(children) == 4
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for trial in trials:
        child = by_number[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        assert trial.user_attrs[RUN_ID_ATTR] == child.info.run_id
        assert child.data.params["augment.rotation"] == str(trial.params["augment.rotation"])
        assert child.data.params["balance.strategy"] == trial.params["balance.strategy"]
        assert child.data.metrics["val_balanced_accuracy"] is not None
        assert "test_balanced_accuracy" in child.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png", "intermediate_values.png",
            "param_importances.png", "best_params.json", "trial_intervals.png"} <= artifacts
    for child in children:  # every trial's value carries its lesion-bootstrap interval
        m = child.data.metrics
        assert m["best_val_balanced_accuracy_ci_low"] <= m["best_val_balanced_accuracy"] <= \
            m["best_val_balanced_accuracy_ci_high"]
    finished = mlflow.get_run(parent.info.run_id)
    assert finished.data.metrics["best_val_balanced_accuracy"] == pytest.approx(
        study.best_value)
    assert finished.data.metrics["trials_complete"] == 4
    # the verdict: the base config trained once more, compared on the shared test split
    runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list",
                              filter_string="tags.`skinml.role` = 'baseline'")
    (baseline,) = [r for r in runs if r.data.tags["optuna.study_name"] == "study"]
    assert baseline.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert baseline.info.status == "FINISHED"
    verdict = finished.data.tags["skinml.verdict"]
    assert verdict == result.verdict
    assert verdict.startswith(f"best trial {study.best_trial.number} vs base config: "
                              "Δ balanced accuracy ")
    m = finished.data.metrics
    assert m["verdict_delta_balanced_accuracy_ci_low"] <= m["verdict_delta_balanced_accuracy"] \
        <= m["verdict_delta_balanced_accuracy_ci_high"]
    assert "verdict.txt" in artifacts


def test_pruned_trial_is_killed_not_finished_and_resume_continues(tracking, tmp_path,
                                                                   synthetic):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = tmp_path / "lr.yaml"
    space.write_text("optim.lr: {type: float, low: 1.0e-7, high: 0.01, log: true}\n")
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    study.enqueue_trial({"optim.lr": 0.003})
    # Settings under which lr=0.003 learns the synthetic classes within a few epochs
    # (val balanced accuracy 0.29-0.43 after epoch 2, 0.57 after 5) while lr=1e-7 stays
    # at chance (<= 0.19), so the second is below the first's value at some epoch.
    learns = tiny(synthetic, "optim.epochs=6", "optim.batch_size=8", "augment.scale_min=0.9",
                  "augment.rotation=0", "optim.warmup_epochs=0", "balance.strategy=none")
    settings = dict(search_space=space, study_name="prune", storage=storage, pruner="median",
                    pruner_startup_trials=1, pruner_warmup_epochs=0, overrides=tuple(learns))
    tune(options(tmp_path, synthetic, n_trials=1, **settings))
    study.enqueue_trial({"optim.lr": 1e-7})  # cannot learn: worse than the median at once
    study.enqueue_trial({"optim.lr": 0.003})
    tune(options(tmp_path, synthetic, n_trials=2, **settings))  # resumes the study
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.COMPLETE]
    parents, children = runs_of("prune")
    assert len(parents) == 2  # one per worker process (here: per invocation)
    pruned = next(c for c in children if c.data.tags["optuna.trial_number"] == "1")
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["optuna.trial_state"] == "PRUNED"
    assert "test_balanced_accuracy" not in pruned.data.metrics
    assert trials[1].user_attrs[RUN_ID_ATTR] == pruned.info.run_id


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell here, not optimize
def test_a_resumed_study_with_the_same_seed_proposes_new_points(tmp_path):
    def first_point(sampler: str, database: str = "optuna.db") -> float:
        study = open_study(options(tmp_path, tmp_path, sampler=sampler, study_name=sampler,
                                   storage=f"sqlite:///{tmp_path / database}"))
        trial = study.ask()
        value = trial.suggest_float("optim.lr", 1e-5, 1e-1, log=True)
        study.tell(trial, value)
        return value

    for sampler in ("tpe", "random"):
        points = [first_point(sampler) for _ in range(3)]  # three resumes, --seed 0 each
        assert len(set(points)) == 3, (sampler, points)
        # A new study is still reproducible from its seed.
        assert first_point(sampler, f"fresh-{sampler}.db") == points[0]


def skinml(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinml", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, **env})


@pytest.mark.parametrize("entry, message", [
    ("augment.rotaton: {type: float, low: 0, high: 90}",
     "entry augment.rotaton: unknown config key augment.rotaton"),
    ("augment.hue: {type: float, low: 0.3, high: 0.1}", "entry augment.hue: low (0.3) must be"),
    ("augment.hue: {type: float, low: 0.0, high: 0.9}",
     "entry augment.hue: augment.hue must be between 0.0 and 0.5, got 0.9"),
    ("balance.strategy: {type: categorical, choices: [focal, magic]}",
     "entry balance.strategy: balance.strategy must be one of"),
    ("augment.rotation: {type: float, low: 0, high: 90, log: true}",
     "entry augment.rotation: log scale needs low > 0, got 0.0"),
    ("optim.lr: {type: float, low: 0, high: 0.1}",
     "entry optim.lr: optim.lr must be between 1e-07 and 10.0, got 0.0"),
    ("optim.lr: {type: uniform, low: 0.001, high: 0.1}",
     "entry optim.lr: needs type: float | int | categorical"),
])
def test_bad_search_space_exits_2_naming_the_entry(tmp_path, entry, message):
    space = tmp_path / "space.yaml"
    space.write_text(entry + "\n")
    result = skinml("tune", "--config", str(DEMO), "--search-space", str(space),
                    "--storage", f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {space}: {message}")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.db").exists()  # nothing started


def worker(tmp_path: Path, data: Path, storage: str, tracking_uri: str, n_trials: int,
           log: str, *extra: str) -> subprocess.Popen:
    """A `skinml tune` process; one torch thread each, as two share this 2-core machine."""
    command = [sys.executable, "-m", "skinml", "tune", "--config", str(DEMO),
               "--search-space", str(SPACE), "--study-name", "shared", "--storage", storage,
               "--n-trials", str(n_trials), "--pruner", "none", "--verdict", "false",
               "--heartbeat-interval", "1",
               "--grace-period", "4", *[f"--set={o}" for o in tiny(data, "optim.epochs=1")],
               *extra]
    return subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                 "OMP_NUM_THREADS": "1"})


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


def running_trial(process: subprocess.Popen, log: Path, storage: str) -> optuna.trial.FrozenTrial:
    """The first trial `process` runs, once it has an MLflow run: Optuna's heartbeat thread
    is then beating (a trial without a heartbeat never goes stale; Optuna skips those)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            continue
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                   if RUN_ID_ATTR in t.user_attrs]
        if running:
            return running[0]
    raise AssertionError(f"no trial started in 180 s: {log.read_text()[-3000:]}")


def test_a_killed_workers_trial_fails_and_the_study_still_completes(tmp_path, synthetic,
                                                                    postgres):
    storage, tracking_uri = postgres
    doomed = worker(tmp_path, synthetic, storage, tracking_uri, 3, "doomed.log",
                    "--set=optim.epochs=20")  # a long trial to be killed in
    killed = running_trial(doomed, tmp_path / "doomed.log", storage)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    survivor = worker(tmp_path, synthetic, storage, tracking_uri, 3, "survivor.log")
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    trials = {t.number: t for t in optuna.load_study(study_name="shared",
                                                     storage=storage).get_trials()}
    assert trials[killed.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 3


def test_a_stalled_worker_whose_trial_was_declared_dead_goes_on(tmp_path, synthetic,
                                                                postgres):
    """A worker stopped longer than the grace period is alive: the other worker fails and
    retries its trial, and the stalled one says so in one line and exits 0 (Optuna alone
    ends it with "Cannot tell a FAIL trial")."""
    storage, tracking_uri = postgres
    slow = worker(tmp_path, synthetic, storage, tracking_uri, 2, "slow.log",
                  "--set=optim.epochs=20")
    stalled = running_trial(slow, tmp_path / "slow.log", storage)
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
    assert trials[stalled.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    run = mlflow.MlflowClient(tracking_uri).get_run(stalled.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.trial_state"] == "FAIL"


def test_mlflow_run_tune_registers_the_best_and_register_study_works(tracking, tmp_path,
                                                                     synthetic):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = " ".join(tiny(synthetic, "optim.epochs=1"))
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local",
         "--experiment-name", "skin-lesion", "-P", "n_trials=2", "-P", "study_name=cli",
         "-P", "verdict=false",
         "-P", f"storage={storage}", "-P", "register_best=true", "-P", "pruner=none",
         "-P", f"overrides={overrides}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = runs_of("cli")
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    client = mlflow.MlflowClient()
    challenger = client.get_model_version_by_alias("skin-lesion-classifier", "challenger")
    best = optuna.load_study(study_name="cli", storage=storage).best_trial
    assert challenger.tags["run_id"] == best.user_attrs[RUN_ID_ATTR]

    again = skinml("register", "--study", "cli", "--storage", storage, cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": tracking})
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"from run {best.user_attrs[RUN_ID_ATTR]}" in again.stdout
    missing = skinml("register", "--study", "nope", "--storage", storage, cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": tracking})
    assert missing.returncode == 2 and "cannot load study 'nope'" in missing.stderr


def test_a_study_whose_trials_are_all_pruned_stops_at_max_trials(tracking, tmp_path,
                                                                 synthetic, monkeypatch):
    import skinml.tune

    def always_prune(trial, config):
        def report(result):
            trial.report(result.val["balanced_accuracy"], result.epoch)
            raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")
        return report

    monkeypatch.setattr(skinml.tune, "_reporter", always_prune)
    result = tune(options(tmp_path, synthetic, n_trials=2, max_trials=3, study_name="pruned"))
    assert result.counts == {"COMPLETE": 0, "PRUNED": 3, "FAIL": 0}
    (parent,), children = runs_of("pruned")
    assert len(children) == 3 and {c.info.status for c in children} == {"KILLED"}
    metrics = mlflow.get_run(parent.info.run_id).data.metrics
    assert metrics["trials_pruned"] == 3
    assert metrics["pruned_epochs_saved"] == 3  # each stopped after epoch 1 of 2
    assert mlflow.get_run(parent.info.run_id).data.params["tune.max_trials"] == "3"


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


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # our ask() stands in for a worker
def test_a_trial_that_never_beat_is_failed_and_the_study_still_ends(tracking, tmp_path,
                                                                    synthetic):
    """A worker killed between `ask` and its first heartbeat leaves a RUNNING trial without
    one; Optuna never fails such a trial, and the study, counting it, used to wait for it."""
    opts = options(tmp_path, synthetic, n_trials=2, study_name="ghost",
                   heartbeat_interval=1, grace_period=2)
    ghost = open_study(opts).ask()  # what the killed worker left: RUNNING, no heartbeat
    result = tune_in_thread(opts, within=240)
    assert result.counts["COMPLETE"] == 2
    trials = optuna.load_study(study_name="ghost", storage=opts.storage).get_trials()
    assert trials[ghost.number].state == TrialState.FAIL


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # our ask() stands in for a worker
def test_a_worker_out_of_time_stops_waiting_for_another_workers_trial(tracking, tmp_path,
                                                                      synthetic):
    """--timeout bounds a worker's wait for a slot too, not only its own trials."""
    opts = options(tmp_path, synthetic, n_trials=1, study_name="busy", timeout=3,
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
