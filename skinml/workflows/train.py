"""One training run, read top to bottom as torchvision's `references/classification` reads:
`train` gets the data and loaders, opens the MLflow run, builds the recipe (model,
optimiser and schedule, balancing loss, augmentation, precision, EMA), the checkpoint and
the tracking callback, hands them to the loop (`engine.fit`), then calibrates, scores the
test split and logs the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from skinml.core.clinical import CLINICAL_COLUMNS
from skinml.core.config import Config, ConfigError
from skinml.evaluation.calibration import clamp_warning, fit_temperature
from skinml.evaluation.metrics import balanced_accuracy, bootstrap_ci, compute_metrics
from skinml.evaluation.scoring import score_split, subgroup_attributes
from skinml.models import build_model, require_weights
from skinml.tracking.logged_model import model_meta
from skinml.tracking.reader import (
    artifact_names,
    epochs_logged,
    logged_config,
    resumable,
    run_metrics,
)
from skinml.tracking.writer import RunLog, reopened_run, training_run
from skinml.training.balance import build_loss
from skinml.training.checkpoint import (
    Candidate,
    Checkpoint,
    TrainingState,
    candidate_path,
    checkpoint_config,
    checkpoint_path,
    load_candidate,
    remove_candidate,
    save_candidate,
)
from skinml.training.choices import build_run_config
from skinml.training.device import precision_for, resolve_device, seed_everything
from skinml.training.distributed import (
    SINGLE,
    Cluster,
    close_cluster,
    device_for,
    gather,
    init_cluster,
)
from skinml.training.engine import EpochResult, FitResult, Predictions, fit, predict_split
from skinml.training.recipe import (
    LoopSettings,
    StepTools,
    build_augment,
    build_ema,
    build_optimizer,
    build_scheduler,
    memory_format,
    preprocess_of,
    steps_per_epoch,
)
from skinml.workflows.prepared import (
    PreparedData,
    SplitBatches,
    batches_for,
    prepare_data,
    split_batches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    best_epoch: int
    val_balanced_accuracy: float
    test: dict[str, float]


@dataclass(frozen=True)
class RunHooks:
    """How a run fits into something bigger (a cross-validation, a tuning study)."""

    nested: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    on_epoch_end: Callable[[EpochResult], None] | None = None
    on_run_start: Callable[[str], None] | None = None  # gets the MLflow run id
    parent_run_id: str | None = None  # nest under this run (a study's, from a worker process)
    # A tuning trial logs what choosing reads (epochs, validation with its interval) and
    # keeps its best-epoch weights as a candidate file; the study logs the model, test
    # scores and figures of the trial that turns out best (`log_candidate`).
    defer_model: bool = False


@dataclass(frozen=True)
class Recipe:
    """The model and everything a training step uses with it, built for one run."""

    model: nn.Module
    tools: StepTools


def train(config: Config, resume_run_id: str | None = None, *,
          data: PreparedData | None = None, hooks: RunHooks | None = None) -> TrainResult:
    """Train, evaluate the best epoch on the test split, and log everything to MLflow.

    `data` reuses an already prepared data set (tuning trials share one); `hooks` nest the
    run under an active parent and add a progress callback (pruning). Under torchrun every
    rank trains; only rank 0 talks to MLflow (`run` is None on the others).
    """
    hooks, resume = hooks or RunHooks(), resume_run_id is not None
    cluster = init_cluster()
    try:
        if resume_run_id is not None:
            config = _config_to_resume(config, resume_run_id)
        require_weights(config.model)  # offline: one line before any run or cache
        if data is None or data.config != config.data:  # data: split by lesion, cached
            data = prepare_data(config, cluster)
        device = device_for(cluster, resolve_device(config.runtime.device))
        sets = split_batches(data, config, device)  # loaders
        _announce(config, data, sets, cluster)
        with _logging_run(config, hooks, resume_run_id, cluster) as run:  # tracking
            run_id = gather(run.run_id if run else None, cluster)[0]
            _log_inputs(run, hooks, config, data, resume)
            seed_everything(config.runtime.seed)
            recipe = build_recipe(config, sets.train.labels, device, cluster)
            checkpoint = Checkpoint(checkpoint_path(config, run_id), config.to_dict())
            state = checkpoint.restore(recipe.model, recipe.tools) if resume else TrainingState()
            outcome = fit(recipe.model, recipe.tools, sets.train, sets.val,
                          LoopSettings.from_config(config), checkpoint, state=state,
                          on_epoch_end=_epoch_callback(run, hooks), cluster=cluster)
            result = _finish(recipe.model, outcome, config, data, sets, run, run_id, cluster,
                             hooks.defer_model)
        if cluster.is_main and not config.runtime.keep_checkpoint:
            checkpoint.remove()  # finished; killed and failed runs never get here
        return result
    finally:
        close_cluster(cluster)


def build_recipe(config: Config, train_labels, device: torch.device,
                 cluster: Cluster = SINGLE) -> Recipe:
    """The model on its device, then, in the order a step uses them: augmentation, the loss
    the balancing strategy asks for, the optimiser and its schedule, precision, EMA.

    `skinml bench train` builds through here too, so it times the step that trains.
    """
    optim, runtime = config.optim, config.runtime
    layout = memory_format(runtime.channels_last)
    model = build_model(config.model).to(device).to(memory_format=layout)
    optimizer = build_optimizer(model, optim)
    steps = steps_per_epoch(train_labels, config.balance, optim.batch_size, runtime.seed,
                            cluster)
    return Recipe(model, StepTools(
        augment=build_augment(config.augment, preprocess_of(config)).to(device),
        loss_fn=build_loss(config.balance, train_labels, optim.label_smoothing).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim, steps),
        precision=precision_for(device, runtime.amp),
        memory_format=layout,
        ema=build_ema(model, optim.ema_decay),  # a copy of the model as it is now, on device
        grad_clip=optim.grad_clip))


def _epoch_callback(run: RunLog | None, hooks: RunHooks
                    ) -> Callable[[EpochResult], None] | None:
    """Each epoch's metrics to the run, then to whoever hooked in (a study's pruner)."""
    if run is None:
        return None

    def on_epoch_end(result: EpochResult) -> None:
        run.log_metrics(result.metrics(), step=result.epoch)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(result)

    return on_epoch_end


def _finish(model: nn.Module, outcome: FitResult, config: Config, data: PreparedData,
            sets: SplitBatches, run: RunLog | None, run_id: str, cluster: Cluster,
            defer_model: bool = False) -> TrainResult:
    """The best epoch's weights: calibrated on validation, logged, scored on the test split
    (a deferred run keeps them as its candidate instead: see `RunHooks.defer_model`)."""
    model.load_state_dict(outcome.best_weights)
    transform = preprocess_of(config).eval_transform().to(sets.test.device)
    # Temperature scaling is fitted on validation, never on the test split it is judged on.
    val = predict_split(model, sets.val, transform, cluster=cluster)
    temperature = fit_temperature(val.probs, val.labels)
    warning = clamp_warning(temperature)
    if warning and run is not None:
        log.warning("%s", warning)
        run.log_text(warning + "\n", "calibration_warning.txt")
    selection = {"best_epoch": outcome.best_epoch,
                 "best_val_balanced_accuracy": outcome.best_score,
                 **_val_interval(val, data, config)}
    if defer_model:
        if run is not None:
            save_candidate(candidate_path(config, run_id), Candidate(
                outcome.best_weights, temperature, config.to_dict(), outcome.best_epoch))
            # At the last epoch's step, not step 0: a model logged later links every step-0
            # metric of its run, and MLflow would write these a second time.
            run.log_metrics(selection, step=max(outcome.epochs_run, 1))
        return TrainResult(run_id, "", outcome.best_epoch, outcome.best_score, {})
    output = predict_split(model, sets.test, transform, cluster=cluster)
    if run is None:
        return TrainResult(run_id, "", outcome.best_epoch, outcome.best_score,
                           compute_metrics(output.labels, output.probs))
    model_uri, test = _log_results(run, model, config, data, output, temperature)
    run.log_summary(selection)
    return TrainResult(run_id, model_uri, outcome.best_epoch, outcome.best_score, test)


def _log_results(run: RunLog, model: nn.Module, config: Config, data: PreparedData,
                 output: Predictions, temperature: float) -> tuple[str, dict[str, float]]:
    """The model (logged before the run's final metrics), then the test split's scores,
    figures and reports. (model URI, test metrics)."""
    model_uri = _log_model(run, model, data, config, temperature)
    rows = data.rows("test")
    scored = score_split("test", output.labels, output.probs, temperature,
                         groups=rows["lesion_id"].to_numpy(),
                         attributes=subgroup_attributes(rows),
                         n_boot=config.runtime.bootstrap, seed=config.runtime.seed)
    test = run.log_scored_split(scored)
    log.info("test balanced accuracy %.4f (%d images), temperature %.2f",
             test["balanced_accuracy"], len(output.labels), temperature)
    return model_uri, test


def log_candidate(run_id: str, path: Path, data: PreparedData | None = None) -> TrainResult:
    """Log a deferred run's model from its candidate file, with the test scores and figures
    the run would have logged itself, then remove the file.

    The weights are exactly those the run was judged on, and the temperature the one it
    fitted on validation: the logged model is the run's as if it had never been deferred.
    """
    candidate = load_candidate(path)
    config = build_run_config(candidate.config, source=str(path))
    if data is None or data.config != config.data:
        data = prepare_data(config)
    device = resolve_device(config.runtime.device)
    model = build_model(config.model).to(device).to(
        memory_format=memory_format(config.runtime.channels_last))
    model.load_state_dict(candidate.weights)
    test = batches_for(data, "test", config.runtime.eval_batch_size, device,
                       clinical=config.model.metadata != "none")
    output = predict_split(model, test, preprocess_of(config).eval_transform().to(device))
    with reopened_run(run_id) as run:
        model_uri, scores = _log_results(run, model, config, data, output,
                                         candidate.temperature)
    remove_candidate(path)
    metrics = run_metrics(run_id)
    return TrainResult(run_id, model_uri, candidate.best_epoch,
                       metrics.get("best_val_balanced_accuracy", float("nan")), scores)


def _val_interval(val: Predictions, data: PreparedData, config: Config) -> dict[str, float]:
    """Lesion-bootstrap 95 % CI of the best epoch's validation balanced accuracy: how much
    the number that selection reads (epochs, trials, runs) can be trusted."""
    if not config.runtime.bootstrap:
        return {}
    lesions = data.rows("val")["lesion_id"].to_numpy()
    low, high = bootstrap_ci(val.labels, val.probs, lesions, balanced_accuracy,
                             n_boot=config.runtime.bootstrap, seed=config.runtime.seed)
    return {"best_val_balanced_accuracy_ci_low": low, "best_val_balanced_accuracy_ci_high": high}


def _log_model(run: RunLog, model: nn.Module, data: PreparedData, config: Config,
               temperature: float) -> str:
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    example = data.rows("test").iloc[0]
    return run.log_model(weights, model_meta(config.model, data.frame_hw, temperature),
                         example["path"], example_clinical=clinical_example(example))


def clinical_example(row: pd.Series) -> dict[str, object]:
    """An image's age, sex and body site as a logged model's input example shows them."""
    return {column: row[column] for column in CLINICAL_COLUMNS if column in row}


def _logging_run(config: Config, hooks: RunHooks, resume_run_id: str | None,
                 cluster: Cluster) -> contextlib.AbstractContextManager[RunLog | None]:
    """The MLflow run on rank 0; no run (None) on the other ranks."""
    if not cluster.is_main:
        return contextlib.nullcontext()
    return training_run(config, _run_name(config), resume_run_id, nested=hooks.nested,
                        tags=hooks.tags, parent_run_id=hooks.parent_run_id)


def _log_inputs(run: RunLog | None, hooks: RunHooks, config: Config, data: PreparedData,
                resume: bool) -> None:
    """What a new run records before training: the config and the split data (a resumed
    run has them already)."""
    if run is None:
        return
    if hooks.on_run_start is not None:
        hooks.on_run_start(run.run_id)
    if not resume:
        run.log_config(config)
        run.log_data(data.frame, data.split, data.source)


def _announce(config: Config, data: PreparedData, sets: SplitBatches, cluster: Cluster
              ) -> None:
    if cluster.is_main:
        log.info("training %s on %s: %d train / %d val / %d test images, %s, %d process(es)",
                 config.model.arch, data.source, len(sets.train), len(sets.val),
                 len(sets.test), sets.train.device, cluster.world_size)


def _run_name(config: Config) -> str:
    if config.runtime.run_name:
        return config.runtime.run_name
    return (f"{config.model.arch}-{config.model.image_size}px-{config.balance.strategy}"
            f"-e{config.optim.epochs}-s{config.runtime.seed}")


def _config_to_resume(config: Config, run_id: str) -> Config:
    """The config a killed run was started with: its checkpoint's, else the config.yaml the
    run logged, when it stopped before (or while) writing its first checkpoint."""
    resumable(run_id)
    path = checkpoint_path(config, run_id)
    if path.is_file():
        return build_run_config(checkpoint_config(path), source=str(path))
    if "config.yaml" not in artifact_names(run_id):
        raise ConfigError(f"--resume {run_id}: no checkpoint at {path} and no config.yaml "
                          "on the run: start a new run instead")
    logged = build_run_config(logged_config(run_id), source=f"run {run_id} config.yaml")
    path = checkpoint_path(logged, run_id)  # where the run itself wrote them
    if path.is_file():
        return build_run_config(checkpoint_config(path), source=str(path))
    epochs = epochs_logged(run_id)  # the first epoch reports just before its checkpoint
    if epochs > 1:
        raise ConfigError(f"--resume {run_id}: its checkpoint {path} is gone after {epochs} "
                          "epochs (removed by `skinml cache prune`?): start a new run instead")
    return logged
