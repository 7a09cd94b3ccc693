"""`skinml tune`: an Optuna study over training runs, one machine's part of it.

Each `skinml tune` is one parent MLflow run, each trial a nested child (with `objective
cv`, a cross-validation parent with its folds nested below it); its trials run in this
process, or in `--workers N` processes (`pool.py`). Many machines share one study through
its storage (`workers.py`). A trial logs what choosing reads; at the end the best trial gets
its model, test scores and figures (`candidates.py`), and the study's summary, figures and
verdict are logged: the best trial against the base config (`verdict.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import TrialState

from skinml.core.config import Config, shipped_or_path
from skinml.core.errors import SkinmlError
from skinml.data.split import assign_folds
from skinml.evaluation import reports
from skinml.models import require_weights
from skinml.tracking import reader
from skinml.tracking.writer import log_study_summary, log_verdict, study_run
from skinml.training.choices import load_run_config
from skinml.workflows.prepared import PreparedData, prepare_data
from skinml.workflows.registry import GateOptions, register_run
from skinml.workflows.tuning.candidates import drop_beaten, log_best_model
from skinml.workflows.tuning.figures import study_figures
from skinml.workflows.tuning.options import (
    OBJECTIVES,
    TuneOptions,
    TuneResult,
    check_options,
    logged_options,
    masked,
    objective_name,
)
from skinml.workflows.tuning.pool import run_workers
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.trials import EPOCHS_ATTR, OUTSIDE_ATTR, RUN_ID_ATTR, best_trial
from skinml.workflows.tuning.verdict import judge_best
from skinml.workflows.tuning.workers import Objective, open_study, optimize

log = logging.getLogger(__name__)

_STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED",
                TrialState.FAIL: "FAIL"}


def tune(options: TuneOptions) -> TuneResult:
    base = load_run_config(options.config, options.overrides)
    space = load_search_space(options.search_space)
    check_options(options)
    require_weights(base.model)  # offline: one line before any run or cache
    data = prepare_data(base)  # the cache is built (or found) once for every trial
    if options.objective == "cv":  # refused (or warned of) once, before the study exists
        assign_folds(data.frame, data.split, options.folds, seed=base.data.split_seed)
    study = open_study(options)
    with study_run(base.runtime.experiment, options.study_name, masked(options.storage),
                   logged_options(options)) as parent:
        if _complete(study) >= options.n_trials:
            log.info("study %s already has %d complete trials", options.study_name,
                     _complete(study))
        elif options.workers > 1:
            run_workers(study, options, base, parent)
        else:
            optimize(study, Objective(study, options, space, data, base, parent), options)
        result = _summarise(study, options, parent, base, data)
    return result


def _summarise(study: optuna.Study, options: TuneOptions, parent: str, base: Config,
               data: PreparedData) -> TuneResult:
    counts = {name: sum(t.state == state for t in study.get_trials(deepcopy=False))
              for state, name in _STATE_NAMES.items()}
    best = best_trial(study)
    has_model = best is not None and log_best_model(study, base, data)
    drop_beaten(study, base)
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
               if best is not None and has_model and options.verdict else None)
    if verdict is not None:  # the CLI prints its line; logged here too it showed twice
        log_verdict(verdict.line(), verdict.delta, verdict.comparison.line())
    registration = None
    if best is not None and has_model and options.register_best:
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


def best_run_id(study_name: str, storage: str) -> str:
    """The MLflow run of a study's best complete trial (for `skinml register --study`)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, ValueError, ImportError, optuna.exceptions.OptunaError) as exc:
        raise SkinmlError(f"cannot load study {study_name!r} from {masked(storage)}: "
                          f"{str(exc).splitlines()[0]}") from None
    best = best_trial(study)
    if best is None:
        raise SkinmlError(f"study {study_name!r} has no complete trial with a run")
    return best.user_attrs[RUN_ID_ATTR]


@dataclass(frozen=True)
class TrialTiming:
    """Where a COMPLETE trial's time went (for `skinml bench tune`)."""

    number: int
    started: datetime
    finished: datetime
    seconds_in_epochs: float
    seconds_outside_epochs: float


def trial_timings(study_name: str, storage: str) -> list[TrialTiming]:
    """The COMPLETE trials of a study, in the order they finished."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    timings = [TrialTiming(t.number, t.datetime_start, t.datetime_complete,
                           t.user_attrs.get(EPOCHS_ATTR, float("nan")),
                           t.user_attrs.get(OUTSIDE_ATTR, float("nan")))
               for t in complete if t.datetime_start and t.datetime_complete]  # always both
    return sorted(timings, key=lambda t: t.finished)


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
