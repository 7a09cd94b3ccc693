"""One trial, from Optuna's side to a training run's and back: the sampled config, the
nested run (one training run, or a cross-validation), pruning on its reports, and the
trial's final state mirrored on the run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import optuna
from optuna.trial import TrialState

from skinml.core.config import Config
from skinml.tracking.writer import log_run_metrics, mark_trial
from skinml.training.checkpoint import (
    candidate_path,
    checkpoint_path,
    remove_candidate,
    remove_checkpoint,
)
from skinml.training.choices import load_run_config
from skinml.training.engine import EpochResult
from skinml.workflows.cv import CVHooks, cross_validate
from skinml.workflows.prepared import PreparedData
from skinml.workflows.train import RunHooks, train
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.search_space import Dimension

RUN_ID_ATTR = "mlflow_run_id"  # the user attribute holding a trial's MLflow run id
# A trial's seconds outside its epochs (set up, validation interval, logging): what a study
# pays per trial beyond training, on the trial and as a metric of its run.
OUTSIDE_ATTR = "seconds_outside_epochs"
EPOCHS_ATTR = "seconds_in_epochs"  # the sum of its epochs' seconds


def run_trial(trial: optuna.Trial, options: TuneOptions, space: tuple[Dimension, ...],
              data: PreparedData, parent_run_id: str | None = None) -> float:
    """Sample a config, train it as a run nested under the study's and return its value; the
    run ends in the trial's state (COMPLETE, PRUNED or FAIL).

    With `log_models="best"` a `val` trial logs no model: it keeps its best epoch's weights
    as a candidate, which the study logs if the trial turns out best (`candidates.py`).
    """
    started_at = time.perf_counter()
    config = load_run_config(options.config, [
        *options.overrides, *suggest(trial, space),
        f"runtime.run_name={options.study_name}-trial-{trial.number}"])
    tags = {"optuna.study_name": options.study_name, "optuna.trial_number": str(trial.number)}
    started: list[str] = []
    epochs: list[float] = []  # each epoch's seconds, as the engine measured them
    defer = defers_models(options)

    def on_run_start(run_id: str) -> None:
        started.append(run_id)
        trial.set_user_attr(RUN_ID_ATTR, run_id)

    complete = False
    try:
        run_id, value, test = fit_config(config, options, data, tags, trial, on_run_start,
                                         parent_run_id=parent_run_id, defer_model=defer,
                                         on_epoch_seconds=epochs.append)
        outside = time.perf_counter() - started_at - sum(epochs)
        trial.set_user_attr(OUTSIDE_ATTR, outside)  # fails if declared dead
        trial.set_user_attr(EPOCHS_ATTR, sum(epochs))
        if test is not None:
            trial.set_user_attr("test_balanced_accuracy", test)
        log_run_metrics(run_id, {"trial_seconds_outside_epochs": outside},
                        step=len(epochs) if defer else 0)
        complete = True
    except optuna.TrialPruned:
        if started:
            mark_trial(started[0], "PRUNED")
        raise
    except KeyboardInterrupt:
        raise  # its run is KILLED already; `skinml tune` again continues the study
    except BaseException:
        if started:
            mark_trial(started[0], "FAIL")
        raise
    finally:  # a study resumes, never a trial: whatever the end, its checkpoint is no use
        if started and not config.runtime.keep_checkpoint:
            remove_checkpoint(checkpoint_path(config, started[0]))
        if started and not complete:  # only a complete trial can become the best
            remove_candidate(candidate_path(config, started[0]))
    mark_trial(run_id, "COMPLETE")
    return value


def defers_models(options: TuneOptions) -> bool:
    """Whether trials keep candidates instead of logging models: `log_models="best"` on the
    validation objective (a cross-validation builds its ensemble from its folds' models)."""
    return options.log_models == "best" and options.objective == "val"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The COMPLETE trial with the highest value that has a run (the first of equals)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if RUN_ID_ATTR in t.user_attrs]
    # a COMPLETE trial has its value
    return max(complete, key=lambda t: cast(float, t.value)) if complete else None


def suggest(trial: optuna.Trial, space: tuple[Dimension, ...]) -> list[str]:
    """Sample the space; a categorical's own parameters only when that choice is drawn."""
    overrides = []
    for dimension in space:
        if dimension.kind == "float":
            low, high = dimension.bounds
            value = trial.suggest_float(dimension.key, low=low, high=high, log=dimension.log)
        elif dimension.kind == "int":
            low, high = dimension.bounds
            value = trial.suggest_int(dimension.key, low=int(low), high=int(high),
                                      log=dimension.log)
        else:
            value = trial.suggest_categorical(dimension.key, choices=list(dimension.choices))
        overrides.append(f"{dimension.key}={_yaml_text(value)}")
        overrides += suggest(trial, dimension.conditional.get(value, ()))
    return overrides


def fit_config(config: Config, options: TuneOptions, data: PreparedData,
               tags: dict[str, str], trial: optuna.Trial | None = None,
               on_run_start: Callable[[str], None] | None = None, *,
               parent_run_id: str | None = None, defer_model: bool = False,
               on_epoch_seconds: Callable[[float], None] | None = None
               ) -> tuple[str, float, float | None]:
    """Train `config` as a nested run the objective's way (one split, or a cross-validation);
    a `trial` gets its reports and may be pruned. (run id, value, test balanced accuracy:
    None for a run that deferred its model)."""
    if options.objective == "cv":  # a trial reports per fold; epochs are only timed
        result = cross_validate(config, options.folds, data=data, hooks=CVHooks(
            nested=True, tags=tags, on_run_start=on_run_start, parent_run_id=parent_run_id,
            on_epoch_end=_epoch_reporter(None, config, on_epoch_seconds),
            on_fold_end=_fold_reporter(trial, options.folds) if trial else None))
        return result.run_id, result.fold_mean, result.test["balanced_accuracy"]
    trained = train(config, data=data, hooks=RunHooks(
        nested=True, tags=tags, on_epoch_end=_epoch_reporter(trial, config, on_epoch_seconds),
        on_run_start=on_run_start,
        parent_run_id=parent_run_id, defer_model=defer_model))
    return (trained.run_id, trained.val_balanced_accuracy,
            None if defer_model else trained.test["balanced_accuracy"])


def _epoch_reporter(trial: optuna.Trial | None, config: Config,
                    on_epoch_seconds: Callable[[float], None] | None = None
                    ) -> Callable[[EpochResult], None] | None:
    """Each epoch's time to `on_epoch_seconds`; a trial's validation score to Optuna, which
    may prune it (never after its last epoch). None when there is no one to tell."""
    if trial is None and on_epoch_seconds is None:
        return None

    def report(result: EpochResult) -> None:
        if on_epoch_seconds is not None:
            on_epoch_seconds(result.epoch_seconds)
        if trial is None:
            return
        trial.report(result.val["balanced_accuracy"], step=result.epoch)
        if result.epoch < config.optim.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")
    return report


def _fold_reporter(trial: optuna.Trial, folds: int) -> Callable[[int, float], None]:
    def report(done: int, running_mean: float) -> None:
        trial.report(running_mean, step=done)
        if done < folds and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {done} of {folds}")
    return report


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
