"""Optuna tunes augmentation and class balancing; each trial is a nested MLflow run.

One parent run per worker process, one child run per trial (with `objective="cv"`, a
cross-validation parent with its folds nested below it). Many workers (processes or
machines) share one study through its storage: `n_trials` is the study's total of
COMPLETE trials, and a worker whose trial would exceed it waits for a running trial to
finish (or to be failed by the heartbeat and retried, or for its own --timeout) instead of
starting a surplus one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

from skinml import compare, reports, tracking
from skinml.config import Config, load_config, shipped_or_path
from skinml.cv import CVHooks, cross_validate
from skinml.engine import EpochResult
from skinml.errors import SkinmlError
from skinml.retry import is_create_race, retry_create_race
from skinml.run_store import logged_model_uri
from skinml.search_space import Dimension, load_search_space
from skinml.train import PreparedData, RunHooks, prepare_data, train
from skinml.verdict import Verdict

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"
BASELINE_ROLE = "baseline"  # the base config's run a study's verdict compares with
_STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED",
                TrialState.FAIL: "FAIL"}


@dataclass(frozen=True)
class TuneOptions:
    config: str | Path  # a path, or a shipped config's name (demo, ham10000)
    search_space: str | Path
    n_trials: int = 20
    max_trials: int | None = None  # trials of any state in total; None: 5 x n_trials
    timeout: float | None = None
    study_name: str = "skin-lesion-tuning"
    storage: str = "sqlite:///optuna.db"
    sampler: str = "tpe"
    objective: str = "val"  # "val": one validation split; "cv": the mean over `folds` folds
    folds: int = 5
    pruner: str | None = None  # None: "patient" for "val", "median" for "cv"
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int | None = None  # steps: epochs (val) or folds (cv); None: 5 / 2
    pruner_patience: int = 3
    register_best: bool = False
    verdict: bool = True  # train the base config once more and compare the best trial with it
    gate_data: str | None = None  # the promotion gate's folder when registering the best
    seed: int = 0
    heartbeat_interval: int = 10
    grace_period: int = 60
    overrides: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    counts: dict[str, int]
    registration: str | None
    verdict: str | None = None  # the best trial against the base config (see verdict.py)


SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}

@dataclass(frozen=True)
class ObjectiveKind:
    """What a trial's value is: its reported steps, default pruning, where its CI is logged."""

    step: str  # one report per epoch, or per fold
    pruner: str
    warmup: int  # steps before a trial can be pruned
    metric: str  # the trial run's metric holding the value, with `_ci_low`/`_ci_high`


OBJECTIVES = {
    "val": ObjectiveKind("epoch", "patient", 5, "best_val_balanced_accuracy"),
    # A CV trial reports the running mean of its folds; 2 folds before pruning.
    "cv": ObjectiveKind("fold", "median", 2, "fold_val_balanced_accuracy_mean"),
}

PRUNERS = {
    # The median of a validation split of ~100 images moves by several points from one
    # epoch to the next: prune only after a warm-up, and only a trial that is below the
    # median and has not improved for `pruner_patience` epochs.
    "patient": lambda o: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(n_startup_trials=o.pruner_startup_trials,
                                    n_warmup_steps=pruner_warmup(o)),
        patience=o.pruner_patience),
    # With --objective cv a step is a fold and the reported value the running mean of the
    # folds so far: every trial is cut into the same folds, so the median compares like
    # with like.
    "median": lambda o: optuna.pruners.MedianPruner(n_startup_trials=o.pruner_startup_trials,
                                                    n_warmup_steps=pruner_warmup(o)),
    "hyperband": lambda o: optuna.pruners.HyperbandPruner(min_resource=1),
    "none": lambda o: optuna.pruners.NopPruner(),
}


def pruner_name(options: TuneOptions) -> str:
    return options.pruner or OBJECTIVES[options.objective].pruner


def pruner_warmup(options: TuneOptions) -> int:
    """Steps before a trial can be pruned: 5 epochs, or 2 folds with --objective cv."""
    if options.pruner_warmup_epochs is not None:
        return options.pruner_warmup_epochs
    return OBJECTIVES[options.objective].warmup


def open_study(options: TuneOptions, attempts: int = 5) -> optuna.Study:
    """Create or load (resume) the study; heartbeats fail and retry a dead worker's trial.

    Workers started together on a fresh database race to create Optuna's tables
    (`skinml.retry`).
    """
    if options.objective not in OBJECTIVES:
        raise SkinmlError(f"--objective must be one of {', '.join(OBJECTIVES)}, "
                          f"got {options.objective!r}")
    if options.objective == "cv" and options.folds < 2:
        raise SkinmlError(f"--folds must be at least 2, got {options.folds}")
    for name, value, registry in (("sampler", options.sampler, SAMPLERS),
                                  ("pruner", pruner_name(options), PRUNERS)):
        if value not in registry:
            raise SkinmlError(f"--{name} must be one of {', '.join(sorted(registry))}, "
                              f"got {value!r}")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return retry_create_race(lambda: _open_study(options),
                             f"the tables of {masked(options.storage)}", attempts)


class _Storage(RDBStorage):
    """Optuna's RDB storage, where a RUNNING trial that never beat also goes stale.

    Optuna fails only trials whose last heartbeat is old, and skips trials with none. A
    worker killed between creating its trial (`ask`) and the heartbeat thread's first beat
    leaves that trial RUNNING for ever, and the other workers, which count it as running,
    wait for it for ever. A live worker beats at once after `ask`, so a trial started over
    the grace period ago that has still never beaten is dead.
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        started_before = datetime.now() - timedelta(seconds=grace)
        with _create_scoped_session(self.scoped_session) as session:
            never_beat = session.query(models.TrialModel).filter(
                models.TrialModel.study_id == study_id,
                models.TrialModel.state == TrialState.RUNNING,
                ~models.TrialModel.heartbeats.any()).all()
            return stale + [trial.trial_id for trial in never_beat
                            if trial.datetime_start and trial.datetime_start < started_before]


def _open_study(options: TuneOptions) -> optuna.Study:
    try:
        storage = _Storage(
            options.storage, heartbeat_interval=options.heartbeat_interval,
            grace_period=options.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        study = optuna.create_study(storage=storage, study_name=options.study_name,
                                    direction="maximize", load_if_exists=True,
                                    sampler=SAMPLERS[options.sampler](options.seed),
                                    pruner=PRUNERS[pruner_name(options)](options))
        study.sampler = SAMPLERS[options.sampler](sampler_seed(options.seed, study))
        return study
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as exc:
        raise SkinmlError(f"cannot open study {options.study_name!r} at "
                          f"{masked(options.storage)}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # SQLAlchemy connection errors and the like
        if type(exc).__module__.startswith("sqlalchemy") and not is_create_race(exc):
            raise SkinmlError(f"cannot open study storage {masked(options.storage)}: "
                              f"{str(exc).splitlines()[0]}") from None
        raise


def sampler_seed(seed: int, study: optuna.Study) -> int:
    """`seed` on a new study; on a resumed one, `seed` mixed with its trial count.

    A sampler seeded alike on every resume would propose trial 0's parameters again (TPE's
    first trials are random draws from the seed alone), so each resume draws fresh points
    and a study stays reproducible from its history.
    """
    trials = len(study.get_trials(deepcopy=False))
    if trials == 0:
        return seed
    return int(np.random.SeedSequence([seed, trials]).generate_state(1)[0])


def max_trials(options: TuneOptions) -> int:
    """The bound on trials of any state: pruned trials count, so a study whose trials are
    all pruned still ends."""
    return options.max_trials or 5 * options.n_trials


def tune(options: TuneOptions) -> TuneResult:
    base = load_config(options.config, list(options.overrides))
    space = load_search_space(options.search_space)
    study = open_study(options)
    data = prepare_data(base)  # the cache is built (or found) once for every trial
    with tracking.study_run(base.runtime.experiment, options.study_name,
                            masked(options.storage), _logged_options(options)) as parent:
        if _complete(study) >= options.n_trials:
            log.info("study %s already has %d complete trials", options.study_name,
                     _complete(study))
        else:
            _optimize(study, _Objective(study, options, space, data), options)
        result = _summarise(study, options, parent, base, data)
    return result


def _optimize(study: optuna.Study, objective: _Objective, options: TuneOptions) -> None:
    """`study.optimize`, going on when another worker declared this one's trial dead.

    A worker that stalled longer than the grace period (a loaded CPU, a suspended VM, a
    slow disk) is not dead, but its trial is failed and retried elsewhere, and Optuna then
    ends this worker with "Cannot tell a FAIL trial" (optuna/optuna#5470). One line says
    so instead, and this worker takes the next trial.
    """
    if options.timeout is not None:
        objective.deadline = time.monotonic() + options.timeout
    while True:
        try:
            with _quiet_about(objective):
                study.optimize(objective, n_trials=None, timeout=objective.seconds_left(),
                               gc_after_trial=True, catch=(SkinmlError,),
                               callbacks=[optuna.study.MaxTrialsCallback(
                                   options.n_trials, states=(TrialState.COMPLETE,)),
                                   optuna.study.MaxTrialsCallback(max_trials(options),
                                                                  states=None),
                                   objective.wait_for_room])
            return
        except ValueError:
            if objective.declared_dead is None:
                raise
            log.warning("trial %d was declared dead by another worker (no heartbeat for over "
                        "%d s; raise --grace-period if this machine stalls): it is retried, "
                        "and this worker goes on", objective.declared_dead,
                        options.grace_period)
            objective.declared_dead = None


@contextlib.contextmanager
def _quiet_about(objective: _Objective) -> Iterator[None]:
    """Without Optuna's traceback for a trial declared dead: `_optimize` says it in one line."""
    logger = logging.getLogger("optuna.study._optimize")

    def keep(record: logging.LogRecord) -> bool:
        number = objective.declared_dead
        return number is None or not record.getMessage().startswith(f"Trial {number} failed")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class _Objective:
    """One trial: wait for a slot, sample a config, train it as a nested run."""

    def __init__(self, study: optuna.Study, options: TuneOptions,
                 space: tuple[Dimension, ...], data: PreparedData) -> None:
        self.study, self.options, self.space, self.data = study, options, space, data
        self.declared_dead: int | None = None  # this worker's trial that another one failed
        self.deadline: float | None = None  # time.monotonic() at which --timeout runs out

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._trial(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker's heartbeat check failed this trial while it ran here.
            self.declared_dead = trial.number
            raise

    def _trial(self, trial: optuna.Trial) -> float:
        self._wait_for_slot(trial)
        overrides = suggest(trial, self.space)
        config = load_config(self.options.config, [
            *self.options.overrides, *overrides,
            f"runtime.run_name={self.options.study_name}-trial-{trial.number}"])
        tags = {"optuna.study_name": self.options.study_name,
                "optuna.trial_number": str(trial.number)}
        started: list[str] = []

        def on_run_start(run_id: str) -> None:
            started.append(run_id)
            trial.set_user_attr(RUN_ID_ATTR, run_id)

        try:
            run_id, value, test = _fit(config, self.options, self.data, tags, trial,
                                       on_run_start)
            trial.set_user_attr("test_balanced_accuracy", test)  # fails if declared dead
        except optuna.TrialPruned:
            if started:
                tracking.mark_trial(started[0], "PRUNED")
            raise
        except BaseException:
            if started:
                tracking.mark_trial(started[0], "FAIL")
            raise
        tracking.mark_trial(run_id, "COMPLETE")
        return value

    def wait_for_room(self, study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        """After a trial: ask for another only if running trials leave room below n_trials.

        If other workers' running trials would complete the study, wait for them: they
        finish (stop here) or die and are retried (then there is room again), or this
        worker's --timeout runs out (stop here).
        """
        while True:
            complete, running = self._counts(before=None)
            if complete >= self.options.n_trials or self._out_of_time():
                study.stop()
                return
            if complete + running < self.options.n_trials:
                return
            self._pause()

    def _wait_for_slot(self, trial: optuna.Trial) -> None:
        """Start only if COMPLETE + earlier RUNNING trials leave room below n_trials.

        Two workers asking at the same moment both see room; the later trial number waits.
        """
        while True:
            complete, ahead = self._counts(before=trial.number)
            reached = complete >= self.options.n_trials
            if reached or self._out_of_time():
                trial.set_user_attr("skinml.surplus", True)
                self.study.stop()
                raise optuna.TrialPruned("the study reached its number of trials" if reached
                                         else "this worker's --timeout ran out")
            if complete + ahead < self.options.n_trials:
                return
            self._pause()

    def _counts(self, before: int | None) -> tuple[int, int]:
        """(COMPLETE, RUNNING) trials, RUNNING only below trial number `before` if given."""
        fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        running = sum(t.state == TrialState.RUNNING and (before is None or t.number < before)
                      for t in trials)
        return complete, running

    def seconds_left(self) -> float | None:
        """What is left of this worker's --timeout (None: no timeout)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _out_of_time(self) -> bool:
        """The worker's --timeout bounds its waits for other workers' trials too."""
        return self.seconds_left() == 0.0

    def _pause(self) -> None:
        time.sleep(min(5.0, max(0.5, self.options.heartbeat_interval / 2)))


def suggest(trial: optuna.Trial, space: tuple[Dimension, ...]) -> list[str]:
    """Sample the space; a categorical's own parameters only when that choice is drawn."""
    overrides = []
    for dimension in space:
        if dimension.kind == "float":
            value = trial.suggest_float(dimension.key, low=dimension.low, high=dimension.high,
                                        log=dimension.log)
        elif dimension.kind == "int":
            value = trial.suggest_int(dimension.key, low=dimension.low, high=dimension.high,
                                      log=dimension.log)
        else:
            value = trial.suggest_categorical(dimension.key, choices=list(dimension.choices))
        overrides.append(f"{dimension.key}={_yaml_text(value)}")
        overrides += suggest(trial, dimension.conditional.get(value, ()))
    return overrides


def _reporter(trial: optuna.Trial, config: Config):
    def report(result: EpochResult) -> None:
        trial.report(result.val["balanced_accuracy"], step=result.epoch)
        if result.epoch < config.optim.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")
    return report


def _fit(config: Config, options: TuneOptions, data: PreparedData, tags: dict[str, str],
         trial: optuna.Trial | None = None, on_run_start=None) -> tuple[str, float, float]:
    """Train `config` as a nested run the objective's way (one split, or a cross-validation);
    a `trial` gets its reports and may be pruned. (run id, value, test balanced accuracy)."""
    if options.objective == "cv":
        result = cross_validate(config, options.folds, data=data, hooks=CVHooks(
            nested=True, tags=tags, on_run_start=on_run_start,
            on_fold_end=_fold_reporter(trial, options.folds) if trial else None))
        return result.run_id, result.fold_mean, result.test["balanced_accuracy"]
    result = train(config, data=data, hooks=RunHooks(
        nested=True, tags=tags, on_epoch_end=_reporter(trial, config) if trial else None,
        on_run_start=on_run_start))
    return result.run_id, result.val_balanced_accuracy, result.test["balanced_accuracy"]


def _fold_reporter(trial: optuna.Trial, folds: int):
    def report(done: int, running_mean: float) -> None:
        trial.report(running_mean, step=done)
        if done < folds and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {done} of {folds}")
    return report


def _summarise(study: optuna.Study, options: TuneOptions, parent: str, base: Config,
               data: PreparedData) -> TuneResult:
    counts = {name: sum(t.state == state for t in study.get_trials(deepcopy=False))
              for state, name in _STATE_NAMES.items()}
    best = _best_trial(study)
    figures = _figures(study, objective_name(options), OBJECTIVES[options.objective].step)
    intervals = _trial_intervals(study, options)
    if intervals is not None:
        figures["trial_intervals.png"] = reports.interval_figure(
            *intervals, title=f"study {study.study_name}: COMPLETE trials",
            xlabel=objective_name(options))
    tracking.log_study_summary(best.value if best else None, best.params if best else {},
                               counts, figures, str(shipped_or_path(options.search_space)),
                               _pruned_epochs_saved(study, options, base.optim.epochs))
    verdict = (_verdict(best, options, base, data)
               if best is not None and options.verdict else None)
    if verdict is not None:
        log.info("%s", verdict.line())
        tracking.log_verdict(verdict.line(), verdict.delta, verdict.comparison.line())
    registration = None
    if best is not None and options.register_best:
        from skinml.registry import GateOptions, register_run

        registration = register_run(best.user_attrs[RUN_ID_ATTR],
                                    gate=GateOptions(gate_data=options.gate_data)).summary()
    return TuneResult(options.study_name, parent, best.value if best else None,
                      best.params if best else {},
                      best.user_attrs.get(RUN_ID_ATTR) if best else None, counts,
                      registration, verdict.line() if verdict else None)


def _verdict(best: optuna.trial.FrozenTrial, options: TuneOptions, base: Config,
             data: PreparedData) -> Verdict | None:
    """The best trial against the base config trained with the same budget and seed, on the
    test split both share (reported, never used to choose)."""
    baseline = _baseline_run(options, base, data)
    best_run = best.user_attrs[RUN_ID_ATTR]
    try:
        image_set = compare.shared_split(best_run, baseline, "test")
    except compare.NotSameSplit as exc:
        log.warning("no verdict: %s", exc)
        return None
    judged = compare.compare_models(logged_model_uri(best_run), logged_model_uri(baseline),
                                    image_set, seed=options.seed)
    return Verdict(best.number, judged)


def _baseline_run(options: TuneOptions, base: Config, data: PreparedData) -> str:
    """The study's `baseline` run: trained once (the first worker to finish), then reused."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(base.runtime.experiment)
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id],
            f"tags.`{tracking.ROLE_TAG}` = '{BASELINE_ROLE}' and "
            f"tags.`optuna.study_name` = '{options.study_name}' and "
            "attributes.status = 'FINISHED'", max_results=1)
        if found:
            return found[0].info.run_id
    runtime = dataclasses.replace(base.runtime, run_name=f"{options.study_name}-baseline")
    config = dataclasses.replace(base, runtime=runtime)
    tags = {tracking.ROLE_TAG: BASELINE_ROLE, "optuna.study_name": options.study_name}
    return _fit(config, options, data, tags)[0]


def _pruned_epochs_saved(study: optuna.Study, options: TuneOptions, budget: int) -> int:
    """Epochs the PRUNED trials did not run, against the epochs each was given (`budget`
    unless sampled; with --objective cv: the epochs of the folds they did not train)."""
    saved = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if trial.user_attrs.get("skinml.surplus"):
            continue  # never started: it waited for a slot the study no longer needed
        epochs = int(trial.params.get("optim.epochs", budget))
        done = max(trial.intermediate_values, default=0)
        if options.objective == "cv":
            saved += max(0, options.folds - done) * epochs
        else:
            saved += max(0, epochs - done)
    return saved


def _trial_intervals(study: optuna.Study, options: TuneOptions
                     ) -> tuple[list[str], list[float], list[float], list[float]] | None:
    """Each COMPLETE trial's value with the 95 % CI its run logged (None without any)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metric = OBJECTIVES[options.objective].metric
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        metrics = client.get_run(run_id).data.metrics if run_id else {}
        low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
        if low is not None and high is not None:
            rows.append((f"trial {trial.number}", trial.value, low, high))
    if not rows:
        return None
    names, values, lows, highs = zip(*rows, strict=True)
    return list(names), list(values), list(lows), list(highs)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if RUN_ID_ATTR in t.user_attrs]
    return max(complete, key=lambda t: t.value) if complete else None


def best_run_id(study_name: str, storage: str) -> str:
    """The MLflow run of a study's best complete trial (for `skinml register --study`)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, ValueError, ImportError, optuna.exceptions.OptunaError) as exc:
        raise SkinmlError(f"cannot load study {study_name!r} from {masked(storage)}: "
                          f"{str(exc).splitlines()[0]}") from None
    best = _best_trial(study)
    if best is None:
        raise SkinmlError(f"study {study_name!r} has no complete trial with a run")
    return best.user_attrs[RUN_ID_ATTR]


OBJECTIVE = "validation balanced accuracy"  # what _Objective returns, named on the figures


def objective_name(options: TuneOptions) -> str:
    if options.objective == "cv":
        return f"mean {OBJECTIVE} of {options.folds} folds"
    return OBJECTIVE


PARALLEL_PARAMS = 5  # more axes than this are unreadable at the MLflow UI's preview size


def _figures(study: optuna.Study, objective: str = OBJECTIVE, step: str = "epoch"
             ) -> dict[str, Any]:
    """Optuna's matplotlib figures, labelled and sized (900 x 600 px) for the MLflow UI.

    One that cannot be drawn yet (too few trials) is skipped with a warning.
    """
    from matplotlib import rc_context
    from optuna.visualization import matplotlib as plots

    makers = {
        "optimization_history.png": lambda: _history_axes(
            plots.plot_optimization_history(study, target_name=objective), objective),
        "param_importances.png": lambda: _importance_axes(
            plots.plot_param_importances(study, target_name=objective), objective),
        "parallel_coordinate.png": lambda: _parallel_axes(plots, study, objective),
        "intermediate_values.png": lambda: _intermediate_axes(
            plots.plot_intermediate_values(study), objective, step),
    }
    missing = _not_drawable(study)
    figures = {}
    for name, make in makers.items():
        if name in missing:
            log.warning("no %s yet: %s", name, missing[name])
            continue
        try:
            # rc_context undoes the ggplot style Optuna sets for every later figure
            with warnings.catch_warnings(), rc_context():
                warnings.simplefilter("ignore")  # "experimental" notices and few-trial hints
                axes = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("no %s: %s", name, exc)
            continue
        figure = axes.figure
        figure.set_size_inches(9, 6)
        figure.suptitle(f"study {study.study_name}")
        figure.set_layout_engine("tight")  # room for full parameter names and legends
        figures[name] = figure
    return figures


def _not_drawable(study: optuna.Study) -> dict[str, str]:
    """Figures with nothing to show yet, and why (Optuna would draw them empty)."""
    complete = _complete(study)
    missing = {}
    if complete == 0:
        missing["optimization_history.png"] = "no complete trial"
    if complete < 2:
        for name in ("param_importances.png", "parallel_coordinate.png"):
            missing[name] = f"{complete} complete trial(s), a comparison needs 2"
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        missing["intermediate_values.png"] = "no trial has reported an epoch"
    return missing


def _important_params(study: optuna.Study) -> tuple[list[str], bool]:
    """The PARALLEL_PARAMS most important parameters, and whether Optuna could rank them
    (if not: the first ones sampled)."""
    try:
        return list(optuna.importance.get_param_importances(study))[:PARALLEL_PARAMS], True
    except (ValueError, RuntimeError, ZeroDivisionError):
        return _sampled_params(study)[:PARALLEL_PARAMS], False


def _sampled_params(study: optuna.Study) -> list[str]:
    return list(dict.fromkeys(name for t in study.get_trials(deepcopy=False)
                              for name in t.params))


def _history_axes(axes, objective: str):
    axes.set_title("each complete trial, and the best so far")
    _label_integer_x(axes, "trial", objective)
    handles, labels = axes.get_legend_handles_labels()
    names = {objective: "complete trial", "Best Value": "best so far"}
    axes.legend(handles, [names.get(label, label) for label in labels], loc="best")
    return axes


def _importance_axes(axes, objective: str):
    axes.set_title(f"parameter importance for {objective}")
    axes.set_xlabel("importance (Optuna PED-ANOVA; sums to 1)")
    axes.set_ylabel("")
    if axes.get_legend() is not None:  # one objective: the legend says nothing
        axes.get_legend().remove()
    return axes


def _parallel_axes(plots, study: optuna.Study, objective: str):
    names, ranked = _important_params(study)
    axes = plots.plot_parallel_coordinate(study, params=names, target_name=objective)
    which = "most important" if ranked else "first sampled"
    axes.set_title(f"the {len(names)} {which} of {len(_sampled_params(study))} parameters",
                   y=1.03)
    axes.tick_params(axis="x", labelrotation=-20)
    for label in axes.get_xticklabels():
        label.set_horizontalalignment("left")
    return axes


def _intermediate_axes(axes, objective: str, step: str):
    what = "running mean " if step == "fold" else ""
    axes.set_title(f"{what}after each {step}, one line per trial (pruned trials stop early)")
    _label_integer_x(axes, step, objective)
    if axes.get_legend() is not None and len(axes.get_lines()) > 12:
        axes.get_legend().remove()  # a legend this long runs off the figure
    return axes


def _label_integer_x(axes, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _logged_options(options: TuneOptions) -> dict[str, Any]:
    return {"n_trials": options.n_trials, "max_trials": max_trials(options),
            "verdict": options.verdict, "objective": options.objective,
            "folds": options.folds if options.objective == "cv" else None,
            "timeout": options.timeout, "sampler": options.sampler,
            "pruner": pruner_name(options), "pruner_warmup": pruner_warmup(options),
            "seed": options.seed,
            "search_space": str(options.search_space), "config": str(options.config)}


def masked(url: str) -> str:
    """The storage URL without its password, fit for tags and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
