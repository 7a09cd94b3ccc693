"""Orchestrates one training run: data, split, cache, model, engine, tracking, logged model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from skinml.calibration import clamp_warning, fit_temperature
from skinml.checkpoint import checkpoint_config
from skinml.config import Config, ConfigError, DataConfig, build_config
from skinml.data import assert_no_leakage, load_ham10000, split_by_lesion
from skinml.data.cache import ImageCache, cache_root, prepare_cache
from skinml.data.loader import CachedBatches
from skinml.data.metadata import default_data_dir
from skinml.device import resolve_device, seed_everything
from skinml.distributed import (
    SINGLE,
    Cluster,
    barrier,
    close_cluster,
    device_for,
    gather,
    init_cluster,
)
from skinml.engine import CheckpointFile, EpochResult, Predictions, fit, predict_split
from skinml.metrics import balanced_accuracy, bootstrap_ci, compute_metrics
from skinml.model import build_model
from skinml.packaging import model_meta
from skinml.recipe import TrainSettings
from skinml.run_store import resumable
from skinml.scoring import score_split, subgroup_attributes
from skinml.tracking import RunLog, training_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    best_epoch: int
    val_balanced_accuracy: float
    test: dict[str, float]


@dataclass(frozen=True)
class PreparedData:
    config: DataConfig
    frame: pd.DataFrame
    split: pd.Series
    cache: ImageCache
    source: str


@dataclass(frozen=True)
class RunHooks:
    """How a run fits into something bigger (a tuning study)."""

    nested: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    on_epoch_end: Callable[[EpochResult], None] | None = None
    on_run_start: Callable[[str], None] | None = None  # gets the MLflow run id


def prepare_data(config: Config, cluster: Cluster = SINGLE) -> PreparedData:
    """Load the folder, split by lesion (checked for leakage), and open the decode-once cache.

    Under torchrun rank 0 builds the cache first; the other ranks then find it complete.
    """
    if not cluster.is_main:
        barrier(cluster)
    data = _prepare(config)
    if cluster.is_main:
        barrier(cluster)
    return data


def _prepare(config: Config) -> PreparedData:
    data = config.data
    source = str(Path(data.dir).expanduser() if data.dir else default_data_dir())
    frame = load_ham10000(source, allow_missing=data.allow_missing)
    split = split_by_lesion(frame, val_frac=data.val_frac, test_frac=data.test_frac,
                            seed=data.split_seed)
    assert_no_leakage(frame, split)
    cache = prepare_cache(frame, size=data.cache_size, skip_corrupt=data.skip_corrupt,
                          workers=config.runtime.workers or None,
                          progress=config.runtime.progress)
    kept = ~frame["image_id"].isin(set(cache.skipped))
    return PreparedData(data, frame[kept], split[kept], cache, source)


def batches_for(data: PreparedData, name: str, batch_size: int, device: torch.device
                ) -> CachedBatches:
    chosen = data.frame[data.split == name]
    return CachedBatches(data.cache.images, data.cache.rows(chosen["image_id"]),
                         chosen["label"].to_numpy(), batch_size, device)


def checkpoint_path(config: Config, run_id: str) -> Path:
    root = Path(config.runtime.checkpoint_dir or cache_root() / "checkpoints").expanduser()
    return root / run_id / "last.pt"


def train(config: Config, resume_run_id: str | None = None, *,
          data: PreparedData | None = None, hooks: RunHooks | None = None) -> TrainResult:
    """Train, evaluate the best epoch on the test split, and log everything to MLflow.

    `data` reuses an already prepared data set (tuning trials share one); `hooks` nest the
    run under an active parent and add a progress callback (pruning). Under torchrun every
    rank trains; only rank 0 talks to MLflow.
    """
    cluster = init_cluster()
    try:
        if resume_run_id is not None:
            resumable(resume_run_id)
            config = _config_of_checkpoint(checkpoint_path(config, resume_run_id))
        if data is None or data.config != config.data:
            data = prepare_data(config, cluster)
        device = device_for(cluster, resolve_device(config.runtime.device))
        batch, eval_batch = config.optim.batch_size, config.runtime.eval_batch_size
        sets = SplitBatches(*(batches_for(data, name, size, device) for name, size in
                              (("train", batch), ("val", eval_batch), ("test", eval_batch))))
        if cluster.is_main:
            log.info("training %s on %s: %d train / %d val / %d test images, %s, %d process(es)",
                     config.model.arch, data.source, len(sets.train), len(sets.val),
                     len(sets.test), device, cluster.world_size)
        hooks = hooks or RunHooks()
        # Only rank 0 talks to MLflow; the other ranks train with no run (`run` is None).
        logging_run = (training_run(config, _run_name(config), resume_run_id,
                                    nested=hooks.nested, tags=hooks.tags)
                       if cluster.is_main else contextlib.nullcontext())
        with logging_run as run:
            return _train_run(config, data, sets, run, hooks, resume_run_id, cluster)
    finally:
        close_cluster(cluster)


@dataclass(frozen=True)
class SplitBatches:
    train: CachedBatches
    val: CachedBatches
    test: CachedBatches


def _train_run(config: Config, data: PreparedData, sets: SplitBatches, run: RunLog | None,
               hooks: RunHooks, resume_run_id: str | None, cluster: Cluster) -> TrainResult:
    """The training proper; `run` is None on the ranks that do not log."""
    run_id = gather(run.run_id if run else None, cluster)[0]
    if run is not None:
        if hooks.on_run_start is not None:
            hooks.on_run_start(run.run_id)
        if resume_run_id is None:
            run.log_config(config)
            run.log_data(data.frame, data.split, data.source)
    seed_everything(config.runtime.seed)
    model = build_model(config.model)

    def on_epoch_end(result: EpochResult) -> None:
        run.log_epoch(result)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(result)

    settings = TrainSettings.from_config(config)
    outcome = fit(model, sets.train, sets.val, settings,
                  CheckpointFile(checkpoint_path(config, run_id), config.to_dict()),
                  on_epoch_end=on_epoch_end if run is not None else None,
                  resume=resume_run_id is not None, cluster=cluster)
    model.load_state_dict(outcome.best_weights)
    transform = settings.preprocess.eval_transform().to(sets.test.device)
    # Temperature scaling is fitted on validation, never on the test split it is judged on.
    val = predict_split(model, sets.val, transform, cluster=cluster)
    temperature = fit_temperature(val.probs, val.labels)
    warning = clamp_warning(temperature)
    if warning and run is not None:
        log.warning("%s", warning)
        run.log_text(warning + "\n", "calibration_warning.txt")
    output = predict_split(model, sets.test, transform, cluster=cluster)
    if run is None:
        return TrainResult(run_id, "", outcome.best_epoch, outcome.best_score,
                           compute_metrics(output.labels, output.probs))
    model_uri = _log_model(run, model, data, config, temperature)  # before its metrics
    rows = data.frame[data.split == "test"]
    scored = score_split("test", output.labels, output.probs, temperature,
                                      groups=rows["lesion_id"].to_numpy(),
                                      attributes=subgroup_attributes(rows),
                                      n_boot=config.runtime.bootstrap, seed=config.runtime.seed)
    test = run.log_scored_split(scored)
    log.info("test balanced accuracy %.4f (%d images), temperature %.2f",
             test["balanced_accuracy"], len(output.labels), temperature)
    run.log_summary({"best_epoch": outcome.best_epoch,
                     "best_val_balanced_accuracy": outcome.best_score,
                     **_val_interval(val, data, config)})
    return TrainResult(run_id, model_uri, outcome.best_epoch, outcome.best_score, test)


def _val_interval(val: Predictions, data: PreparedData, config: Config) -> dict[str, float]:
    """Lesion-bootstrap 95 % CI of the best epoch's validation balanced accuracy: how much
    the number that selection reads (epochs, trials, runs) can be trusted."""
    if not config.runtime.bootstrap:
        return {}
    lesions = data.frame.loc[data.split == "val", "lesion_id"].to_numpy()
    low, high = bootstrap_ci(val.labels, val.probs, lesions, balanced_accuracy,
                             n_boot=config.runtime.bootstrap, seed=config.runtime.seed)
    return {"best_val_balanced_accuracy_ci_low": low, "best_val_balanced_accuracy_ci_high": high}


def _log_model(run: RunLog, model: torch.nn.Module, data: PreparedData,
               config: Config, temperature: float) -> str:
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    frame_hw = tuple(int(s) for s in data.cache.images.shape[1:3])
    example = data.frame.loc[data.split == "test", "path"].iloc[0]
    return run.log_model(weights, model_meta(config.model, frame_hw, temperature), example)


def _run_name(config: Config) -> str:
    if config.runtime.run_name:
        return config.runtime.run_name
    return (f"{config.model.arch}-{config.model.image_size}px-{config.balance.strategy}"
            f"-e{config.optim.epochs}-s{config.runtime.seed}")


def _config_of_checkpoint(path: Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"no checkpoint to resume at {path}")
    return build_config(checkpoint_config(path), source=str(path))
