"""Lesion-grouped K-fold cross-validation: one nested training run per fold; the parent run
holds the out-of-fold (OOF) predictions, their metrics, and the fold ensemble as its model.

The test split stays the one `split_by_lesion` makes: cross-validation cuts only the rest
into folds, so the ensemble's test score is as honest as a single run's. OOF metrics read
each fold's validation images, which also chose that fold's best epoch and temperature:
they are slightly optimistic, the test split is the unbiased number.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from skinml.core.config import Config, ConfigError
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data.split import assert_no_leakage, assign_folds, fold_split
from skinml.evaluation import reports
from skinml.evaluation.calibration import apply_temperature
from skinml.evaluation.metrics import fold_mean_ci
from skinml.evaluation.scoring import score_split, subgroup_attributes
from skinml.models import require_weights
from skinml.tracking import reader
from skinml.tracking.logged_model import load_model, model_meta, predict_paths
from skinml.tracking.writer import RunLog, cv_run, mark_killed
from skinml.training.checkpoint import checkpoint_path, remove_checkpoint
from skinml.training.choices import build_run_config
from skinml.training.engine import EpochResult
from skinml.workflows.prepared import PreparedData, prepare_data
from skinml.workflows.train import RunHooks, clinical_example, train

log = logging.getLogger(__name__)

FOLD_TAG = "skinml.cv_fold"  # on each fold's run: its fold number (0-based)
PARENT_TAG = "skinml.cv_parent"  # on each fold's run: the parent run id
FOLDS_PARAM = "cv.folds"


@dataclass(frozen=True)
class FoldResult:
    fold: int
    run_id: str
    val_balanced_accuracy: float
    val_rows: np.ndarray  # positions in the prepared frame
    val_probs: np.ndarray  # served (calibrated) probabilities
    val_uncalibrated: np.ndarray
    test_uncalibrated: np.ndarray
    temperature: float
    weights: dict


@dataclass(frozen=True)
class CVResult:
    run_id: str
    model_uri: str
    fold_run_ids: list[str]
    oof: dict[str, float]
    test: dict[str, float]
    fold_mean: float  # mean of the folds' validation balanced accuracies


@dataclass(frozen=True)
class CVHooks:
    """How a cross-validation fits into something bigger (a tuning study's trial)."""

    nested: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    on_run_start: Callable[[str], None] | None = None  # gets the parent run id
    # After each fold: (folds done, running mean of their validation balanced accuracy).
    on_fold_end: Callable[[int, float], None] | None = None
    on_epoch_end: Callable[[EpochResult], None] | None = None  # each fold's epochs
    parent_run_id: str | None = None  # nest under this run (a study's, from a worker)


def cross_validate(config: Config, folds: int, resume_run_id: str | None = None, *,
                   data: PreparedData | None = None, hooks: CVHooks | None = None) -> CVResult:
    """Train one model per fold (nested runs), then log OOF metrics and the fold ensemble.

    `resume_run_id` continues a killed cross-validation: folds whose run finished are kept
    (their predictions are made again from their logged models), the others train anew.
    `data` reuses a prepared data set (a study's trials share one).
    """
    if resume_run_id is not None:
        reader.resumable(resume_run_id)
        config, folds = _config_of_parent(resume_run_id)
    hooks = hooks or CVHooks()
    require_weights(config.model)  # offline: one line before any run or cache
    if data is None or data.config != config.data:
        data = prepare_data(config)
    # Before the parent run opens: too many folds for a class is refused with no run made.
    assignment = assign_folds(data.frame, data.split, folds, seed=config.data.split_seed,
                              warn=not hooks.nested)  # a study's trial: the study warned
    name = config.runtime.run_name or f"{config.model.arch}-cv{folds}-s{config.runtime.seed}"
    with cv_run(config, name, folds, resume_run_id, hooks.nested, hooks.tags,
                hooks.parent_run_id) as parent:
        if hooks.on_run_start is not None:
            hooks.on_run_start(parent.run_id)
        if resume_run_id is None:
            parent.log_config(config)
            parent.log_data(data.frame, data.split, data.source)
        finished = _finished_folds(parent.run_id, config)
        if resume_run_id is not None:
            log.info("%s", _resume_line(resume_run_id, finished, folds))
        results = []
        for fold in range(folds):
            split = fold_split(data.split, assignment, fold)
            assert_no_leakage(data.frame, split)
            fold_data = dataclasses.replace(data, split=split)
            run_id = finished.get(fold) or _train_fold(config, fold_data, fold, folds,
                                                       parent.run_id, name, hooks.on_epoch_end)
            results.append(_fold_result(fold, run_id, fold_data, config))
            parent.log_metrics({"fold_val_balanced_accuracy":
                                results[-1].val_balanced_accuracy}, step=fold + 1)
            if hooks.on_fold_end is not None:
                hooks.on_fold_end(fold + 1, float(np.mean([r.val_balanced_accuracy
                                                           for r in results])))
        return _log_parent(parent, config, data, assignment, results)


def _train_fold(config: Config, data: PreparedData, fold: int, folds: int, parent_id: str,
                name: str, on_epoch_end: Callable[[EpochResult], None] | None = None) -> str:
    log.info("fold %d of %d", fold + 1, folds)
    runtime = dataclasses.replace(config.runtime, run_name=f"{name}-fold{fold + 1}")
    hooks = RunHooks(nested=True, tags={FOLD_TAG: str(fold), PARENT_TAG: parent_id},
                     on_epoch_end=on_epoch_end)
    return train(dataclasses.replace(config, runtime=runtime), data=data, hooks=hooks).run_id


def _fold_result(fold: int, run_id: str, data: PreparedData, config: Config) -> FoldResult:
    """The fold model's predictions on its validation fold (OOF) and on the test split."""
    run = reader.get_run(run_id)
    model = load_model(reader.model_uri_of(run))
    served = model.unwrap_python_model()
    rows = np.flatnonzero(data.split.to_numpy() == "val")
    test_rows = np.flatnonzero(data.split.to_numpy() == "test")
    paths = data.frame["path"].to_numpy()
    frame = data.frame  # age, sex and body site go along to a fusion model
    val_uncalibrated = predict_paths(model, list(paths[rows]), calibrated=False,
                                     clinical=frame.iloc[rows])
    test_uncalibrated = predict_paths(model, list(paths[test_rows]), calibrated=False,
                                      clinical=frame.iloc[test_rows])
    return FoldResult(fold, run_id, run.data.metrics["best_val_balanced_accuracy"], rows,
                      apply_temperature(val_uncalibrated, served.temperature), val_uncalibrated,
                      test_uncalibrated, served.temperature,
                      {k: v.cpu() for k, v in served.network.state_dict().items()})


def _log_parent(parent: RunLog, config: Config, data: PreparedData,
                assignment: pd.Series, results: list[FoldResult]) -> CVResult:
    frame = data.frame
    order = np.concatenate([r.val_rows for r in results])
    oof_probs = np.concatenate([r.val_probs for r in results])
    oof_uncalibrated = np.concatenate([r.val_uncalibrated for r in results])
    rows = frame.iloc[order]
    table = rows[["image_id", "lesion_id", "dx", "label"]].assign(
        fold=assignment.iloc[order].to_numpy(),
        run_id=np.concatenate([[r.run_id] * len(r.val_rows) for r in results]),
        **dict(zip(PROBABILITY_COLUMNS, oof_probs.T, strict=True)))
    parent.log_text(table.to_csv(index=False), "oof_predictions.csv")
    members = [{"weights": r.weights, "temperature": r.temperature} for r in results]
    test_rows = data.rows("test")
    model_uri = parent.log_model({}, model_meta(config.model, data.frame_hw, np.nan),
                                 test_rows["path"].iloc[0], members=members,  # before metrics
                                 example_clinical=clinical_example(test_rows.iloc[0]))
    runtime = config.runtime
    oof = score_split("oof", rows["label"].to_numpy(), oof_uncalibrated, np.nan,
                      rows["lesion_id"].to_numpy(), subgroup_attributes(rows),
                      n_boot=runtime.bootstrap, seed=runtime.seed, served=oof_probs)
    oof_scores = parent.log_scored_split(oof, folder="oof")

    ensemble = np.mean([apply_temperature(r.test_uncalibrated, r.temperature)
                        for r in results], axis=0)
    test = score_split("test", test_rows["label"].to_numpy(),
                       np.mean([r.test_uncalibrated for r in results], axis=0), np.nan,
                       test_rows["lesion_id"].to_numpy(), subgroup_attributes(test_rows),
                       n_boot=runtime.bootstrap, seed=runtime.seed, served=ensemble)
    test_scores = parent.log_scored_split(test)

    fold_scores = np.array([r.val_balanced_accuracy for r in results])
    low, high = fold_mean_ci(rows["label"].to_numpy(), oof_probs,
                             assignment.iloc[order].to_numpy(), rows["lesion_id"].to_numpy(),
                             n_boot=runtime.bootstrap, seed=runtime.seed)
    parent.log_summary({
        # What `skinml register` and run comparisons read as the validation score.
        "best_val_balanced_accuracy": oof_scores["balanced_accuracy"],
        "fold_val_balanced_accuracy_mean": float(fold_scores.mean()),
        "fold_val_balanced_accuracy_mean_ci_low": low,
        "fold_val_balanced_accuracy_mean_ci_high": high,
        "fold_val_balanced_accuracy_sd": float(fold_scores.std(ddof=1)),
    })
    parent.log_figures({"cv_folds.png": reports.fold_figure(fold_scores, oof_scores,
                                                            parent.title)})
    log.info("OOF balanced accuracy %.4f (%d images), fold ensemble test balanced accuracy "
             "%.4f (%d images)", oof_scores["balanced_accuracy"], len(rows),
             test_scores["balanced_accuracy"], len(test_rows))
    return CVResult(parent.run_id, model_uri, [r.run_id for r in results], oof_scores,
                    test_scores, float(fold_scores.mean()))


def _resume_line(parent_id: str, finished: dict[int, str], folds: int) -> str:
    """Which folds a resumed cross-validation keeps (1-based, as logged) and where it
    starts training again."""
    kept = ", ".join(f"fold {fold + 1} (run {run_id})"
                     for fold, run_id in sorted(finished.items())) or "no fold"
    todo = [fold for fold in range(folds) if fold not in finished]
    start = (f"starting with fold {todo[0] + 1} of {folds}" if todo
             else f"all {folds} folds finished, none to train")
    return f"resuming cross-validation {parent_id}: keeping {kept}; {start}"


def _finished_folds(parent_id: str, config: Config) -> dict[int, str]:
    """Fold number -> run id of the folds that finished; runs of killed folds are marked
    KILLED (a SIGKILLed run stays RUNNING) and their folds train again in a new run, so
    their checkpoints are of no more use and are removed."""
    parent = reader.get_run(parent_id)
    finished = {}
    for run in reader.tagged_runs(parent.info.experiment_id, {PARENT_TAG: parent_id}):
        fold = int(run.data.tags[FOLD_TAG])
        if run.info.status == "FINISHED" and reader.model_outputs(run):
            finished[fold] = run.info.run_id
            continue
        if run.info.status == "RUNNING":
            mark_killed(run.info.run_id)
        remove_checkpoint(checkpoint_path(config, run.info.run_id))
    return finished


def _config_of_parent(run_id: str) -> tuple[Config, int]:
    """The config and fold count a cross-validation run was started with."""
    folds = reader.run_params(run_id).get(FOLDS_PARAM)
    if folds is None:
        raise ConfigError(f"run {run_id} is not a skinml cross-validation run (no {FOLDS_PARAM})")
    return build_run_config(reader.logged_config(run_id), f"run {run_id} config.yaml"), int(folds)
