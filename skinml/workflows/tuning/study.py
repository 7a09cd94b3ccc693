"""`skinml tune`: an Optuna study over training runs, one worker's part of it.

Each worker process is one parent MLflow run, each trial a nested child (with `objective
cv`, a cross-validation parent with its folds nested below it). Many workers share one study
through its storage (`workers.py`). At the end a worker logs the study's summary and
figures, and its verdict: the best trial against the base config (`verdict.py`).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from skinml.core.config import Config, shipped_or_path
from skinml.core.errors import SkinmlError
from skinml.data.split import assign_folds
from skinml.evaluation import reports
from skinml.tracking import reader
from skinml.tracking.retry import is_create_race, retry_create_race
from skinml.tracking.writer import log_study_summary, log_verdict, study_run
from skinml.training.choices import load_run_config
from skinml.workflows.prepared import PreparedData, prepare_data
from skinml.workflows.registry import GateOptions, register_run
from skinml.workflows.tuning.figures import study_figures
from skinml.workflows.tuning.options import (
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    TuneOptions,
    TuneResult,
    check_options,
    logged_options,
    masked,
    objective_name,
    pruner_name,
)
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.storage import HeartbeatStorage
from skinml.workflows.tuning.trials import RUN_ID_ATTR
from skinml.workflows.tuning.verdict import judge_best
from skinml.workflows.tuning.workers import Objective, optimize

log = logging.getLogger(__name__)

_STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED",
                TrialState.FAIL: "FAIL"}


def tune(options: TuneOptions) -> TuneResult:
    base = load_run_config(options.config, options.overrides)
    space = load_search_space(options.search_space)
    check_options(options)
    data = prepare_data(base)  # the cache is built (or found) once for every trial
    if options.objective == "cv":  # refused (or warned of) once, before the study exists
        assign_folds(data.frame, data.split, options.folds, seed=base.data.split_seed)
    study = open_study(options)
    with study_run(base.runtime.experiment, options.study_name, masked(options.storage),
                   logged_options(options)) as parent:
        if _complete(study) >= options.n_trials:
            log.info("study %s already has %d complete trials", options.study_name,
                     _complete(study))
        else:
            optimize(study, Objective(study, options, space, data), options)
        result = _summarise(study, options, parent, base, data)
    return result


def open_study(options: TuneOptions, attempts: int = 5) -> optuna.Study:
    """Create or load (resume) the study; heartbeats fail and retry a dead worker's trial.

    Workers started together on a fresh database race to create Optuna's tables
    (`skinml.tracking.retry`).
    """
    check_options(options)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return retry_create_race(lambda: _open_study(options),
                             f"the tables of {masked(options.storage)}", attempts)


def _open_study(options: TuneOptions) -> optuna.Study:
    try:
        storage = HeartbeatStorage(
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


def _summarise(study: optuna.Study, options: TuneOptions, parent: str, base: Config,
               data: PreparedData) -> TuneResult:
    counts = {name: sum(t.state == state for t in study.get_trials(deepcopy=False))
              for state, name in _STATE_NAMES.items()}
    best = _best_trial(study)
    figures = study_figures(study, objective_name(options), OBJECTIVES[options.objective].step)
    intervals = _trial_intervals(study, options)
    if intervals is not None:
        figures["trial_intervals.png"] = reports.interval_figure(
            *intervals, title=f"study {study.study_name}: COMPLETE trials",
            xlabel=objective_name(options))
    log_study_summary(best.value if best else None, best.params if best else {}, counts,
                      figures, str(shipped_or_path(options.search_space)),
                      _pruned_epochs_saved(study, options, base.optim.epochs))
    verdict = (judge_best(best, options, base, data)
               if best is not None and options.verdict else None)
    if verdict is not None:  # the CLI prints its line; logged here too it showed twice
        log_verdict(verdict.line(), verdict.delta, verdict.comparison.line())
    registration = None
    if best is not None and options.register_best:
        registration = register_run(best.user_attrs[RUN_ID_ATTR],
                                    gate=GateOptions(gate_data=options.gate_data)).summary()
    return TuneResult(options.study_name, parent, best.value if best else None,
                      best.params if best else {},
                      best.user_attrs.get(RUN_ID_ATTR) if best else None, counts,
                      registration, verdict.line() if verdict else None)


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
    metric = OBJECTIVES[options.objective].metric
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        metrics = reader.run_metrics(run_id) if run_id else {}
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


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
