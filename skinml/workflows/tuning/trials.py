"""One trial, from Optuna's side to a training run's and back: the sampled config, the
nested run (one training run, or a cross-validation), pruning on its reports, and the
trial's final state mirrored on the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from skinml.core.config import Config
from skinml.tracking.writer import mark_trial
from skinml.training.checkpoint import checkpoint_path, remove_checkpoint
from skinml.training.choices import load_run_config
from skinml.training.engine import EpochResult
from skinml.workflows.cv import CVHooks, cross_validate
from skinml.workflows.prepared import PreparedData
from skinml.workflows.train import RunHooks, train
from skinml.workflows.tuning.options import TuneOptions
from skinml.workflows.tuning.search_space import Dimension

RUN_ID_ATTR = "mlflow_run_id"  # the user attribute holding a trial's MLflow run id


def run_trial(trial: optuna.Trial, options: TuneOptions, space: tuple[Dimension, ...],
              data: PreparedData) -> float:
    """Sample a config, train it as a nested run and return its value; the run ends in the
    trial's state (COMPLETE, PRUNED or FAIL)."""
    config = load_run_config(options.config, [
        *options.overrides, *suggest(trial, space),
        f"runtime.run_name={options.study_name}-trial-{trial.number}"])
    tags = {"optuna.study_name": options.study_name, "optuna.trial_number": str(trial.number)}
    started: list[str] = []

    def on_run_start(run_id: str) -> None:
        started.append(run_id)
        trial.set_user_attr(RUN_ID_ATTR, run_id)

    try:
        run_id, value, test = fit_config(config, options, data, tags, trial, on_run_start)
        trial.set_user_attr("test_balanced_accuracy", test)  # fails if declared dead
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
    mark_trial(run_id, "COMPLETE")
    return value


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


def fit_config(config: Config, options: TuneOptions, data: PreparedData,
               tags: dict[str, str], trial: optuna.Trial | None = None,
               on_run_start: Callable[[str], None] | None = None) -> tuple[str, float, float]:
    """Train `config` as a nested run the objective's way (one split, or a cross-validation);
    a `trial` gets its reports and may be pruned. (run id, value, test balanced accuracy)."""
    if options.objective == "cv":
        result = cross_validate(config, options.folds, data=data, hooks=CVHooks(
            nested=True, tags=tags, on_run_start=on_run_start,
            on_fold_end=_fold_reporter(trial, options.folds) if trial else None))
        return result.run_id, result.fold_mean, result.test["balanced_accuracy"]
    result = train(config, data=data, hooks=RunHooks(
        nested=True, tags=tags, on_epoch_end=_epoch_reporter(trial, config) if trial else None,
        on_run_start=on_run_start))
    return result.run_id, result.val_balanced_accuracy, result.test["balanced_accuracy"]


def _epoch_reporter(trial: optuna.Trial, config: Config) -> Callable[[EpochResult], None]:
    def report(result: EpochResult) -> None:
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
