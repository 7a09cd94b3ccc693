"""The training engine: epoch loops and `fit`. Knows nothing of MLflow or Optuna.

Read top to bottom: `train_one_epoch` (one pass of optimisation), `predict` (probabilities
over batches), `predict_split` (a whole split, gathered over processes), `fit` (epochs,
the best epoch, early stopping, checkpoints). `fit` builds nothing: the model, its step
tools and the checkpoint come from the training workflow's recipe. Progress leaves through
`on_epoch_end`, so tracking and pruning hook in without touching the loop. Optional
features do nothing when off: the precision's autocast and scaler always exist, EMA is
None when unused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from skinml.data.loader import Batch, CachedBatches
from skinml.data.preprocess import EvalTransform
from skinml.evaluation.metrics import compute_metrics
from skinml.models import run_network
from skinml.training.balance import epoch_order
from skinml.training.checkpoint import Checkpoint, TrainingState
from skinml.training.device import seed_everything
from skinml.training.distributed import SINGLE, Cluster, gather, shard, sync_buffers, wrap
from skinml.training.recipe import LoopSettings, StepTools, epoch_generator

log = logging.getLogger(__name__)

Batches = Iterable[Batch]


@dataclass(frozen=True)
class TrainStats:
    loss: float
    images: int
    seconds: float


@dataclass(frozen=True)
class Predictions:
    probs: np.ndarray
    labels: np.ndarray
    loss: float


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch, as the callback sees it."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val: dict[str, float]
    lr: float
    epoch_seconds: float
    train_images_per_second: float
    is_best: bool
    best_epoch: int
    best_score: float

    def metrics(self) -> dict[str, float]:
        """The epoch as metric names and values (step = `epoch`)."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss,
                **{f"val_{k}": v for k, v in self.val.items()},
                "lr": self.lr, "epoch_seconds": self.epoch_seconds,
                "train_images_per_second": self.train_images_per_second}


@dataclass(frozen=True)
class FitResult:
    best_weights: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    epochs_run: int = 0  # the last epoch trained (early stopping may end before the budget)


def train_one_epoch(model: nn.Module, batches: Batches, tools: StepTools,
                    total: int | None = None, progress: bool = False) -> TrainStats:
    """One pass over `batches`; returns the mean training loss and throughput."""
    model.train()
    scaler = tools.precision.scaler
    started, seen, loss_sum = time.perf_counter(), 0, None
    # disable=None: tqdm draws only on a terminal, so logs in files get no bar redraws.
    bar = tqdm(batches, total=total, desc="train", unit="batch", leave=False,
               disable=None if progress else True)
    for images, labels, clinical in bar:
        # Under mixup/cutmix each image keeps its own metadata (the mix is of pixels).
        inputs, targets = tools.augment(images, labels)
        inputs = inputs.contiguous(memory_format=tools.memory_format)
        with tools.precision.autocast():
            loss = tools.loss_fn(run_network(model, inputs, clinical), targets)
        tools.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tools.grad_clip:
            scaler.unscale_(tools.optimizer)  # clip the true gradients, not fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), tools.grad_clip)
        scale = scaler.get_scale()  # 1.0 when the scaler is off (fp32, bf16)
        scaler.step(tools.optimizer)
        scaler.update()
        if scaler.get_scale() >= scale:  # a step fp16 skipped (inf gradients) moves no schedule
            tools.scheduler.step()
        if tools.ema is not None:
            tools.ema.update_parameters(model)
        # Summed on the device: reading the loss each step would make the CPU wait for the
        # GPU and stop it queuing the next batch.
        weighted = loss.detach().float() * len(images)
        loss_sum = weighted if loss_sum is None else loss_sum + weighted
        seen += len(images)
    if loss_sum is None:
        return TrainStats(0.0, 0, time.perf_counter() - started)
    total_loss = float(loss_sum)  # waits for the queued work, so the time below is real
    return TrainStats(total_loss / seen, seen, time.perf_counter() - started)


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, transform: EvalTransform,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            memory_format: torch.memory_format = torch.contiguous_format) -> Predictions:
    """Softmax probabilities, labels and mean cross-entropy over `batches`."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for images, targets, clinical in batches:
        inputs = transform(images).contiguous(memory_format=memory_format)
        with autocast():
            logits = run_network(model, inputs, clinical).float()
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        probs.append(logits.softmax(1).cpu().numpy())
        labels.append(targets.cpu().numpy())
    labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return Predictions(np.concatenate(probs) if probs else np.zeros((0, 0)), labels_all,
                       loss_sum / max(len(labels_all), 1))


def predict_split(model: nn.Module, batches: CachedBatches, transform: EvalTransform,
                  tools: StepTools | None = None, cluster: Cluster = SINGLE) -> Predictions:
    """`predict` over a whole split; under torchrun each rank takes a share, then all gather.

    The result is identical on every rank and covers every image exactly once.
    """
    positions = np.arange(len(batches))[cluster.rank::cluster.world_size]
    part = (predict(model, batches.epoch(positions), transform) if tools is None else
            predict(model, batches.epoch(positions), transform, tools.precision.autocast,
                    tools.memory_format))
    pieces = gather((positions, part.probs, part.labels, part.loss * len(part.labels)), cluster)
    order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
    probs = np.concatenate([p[1] for p in pieces if len(p[1])])[order]
    labels = np.concatenate([p[2] for p in pieces])[order]
    return Predictions(probs, labels, sum(p[3] for p in pieces) / max(len(labels), 1))


@dataclass(frozen=True)
class _Loop:
    """What every epoch of one `fit` shares."""

    runner: nn.Module  # the model as trained: DDP-wrapped and/or compiled
    model: nn.Module  # the plain module: evaluated, checkpointed
    train: CachedBatches
    val: CachedBatches
    tools: StepTools
    transform: EvalTransform
    settings: LoopSettings
    cluster: Cluster


def fit(model: nn.Module, tools: StepTools, train: CachedBatches, val: CachedBatches,
        settings: LoopSettings, checkpoint: Checkpoint, *, state: TrainingState | None = None,
        on_epoch_end: Callable[[EpochResult], None] | None = None,
        cluster: Cluster = SINGLE) -> FitResult:
    """Train from `state` (a restored checkpoint's; None: from the start) to
    `settings.epochs` or early stopping, checkpointing each epoch.

    `model` is on the batches' device and `tools` were built for it. A resumed run ends
    exactly where an uninterrupted one would: each epoch's randomness is seeded from (seed,
    epoch). Under torchrun each rank trains on its shard; only rank 0 writes the checkpoint.
    """
    state = state or TrainingState()
    runner = wrap(model, cluster, train.device)
    if settings.compile:  # torch types the compiled Module as a callable; it is a Module
        runner = cast(nn.Module, torch.compile(runner))
    loop = _Loop(runner, model, train, val, tools,
                 settings.preprocess.eval_transform().to(train.device), settings, cluster)
    for epoch in range(state.epoch + 1, settings.epochs + 1):
        result = _run_epoch(loop, state, epoch)
        # Report before checkpointing: a crash in between repeats an epoch's (identical)
        # metrics on resume instead of losing them.
        if on_epoch_end is not None:
            on_epoch_end(result)
        if cluster.is_main:
            checkpoint.save(model, tools, state)
        patience = settings.early_stopping_patience
        if patience and state.stale_epochs >= patience and epoch < settings.epochs:
            log.info("early stopping after epoch %d: no val gain for %d epochs", epoch, patience)
            break
    return FitResult(state.best_weights, state.best_epoch, state.best_score, state.epoch)


def _run_epoch(loop: _Loop, state: TrainingState, epoch: int) -> EpochResult:
    started = time.perf_counter()
    settings, cluster, tools = loop.settings, loop.cluster, loop.tools
    generator = epoch_generator(settings.seed, epoch)
    epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    order = shard(epoch_order(loop.train.labels, settings.balance, generator), cluster)
    seed_everything(epoch_seed + cluster.rank)  # each rank its own augmentations
    steps = max(1, len(order) // settings.batch_size)
    lr = tools.optimizer.param_groups[0]["lr"]
    stats = train_one_epoch(loop.runner, loop.train.epoch(order, drop_last=True), tools,
                            total=steps, progress=settings.progress and cluster.is_main)
    # Evaluate the plain module: DDP's forward would sync buffers across uneven shards.
    scored = tools.ema.module if tools.ema is not None else loop.model
    sync_buffers(scored, cluster)
    output = predict_split(scored, loop.val, loop.transform, tools, cluster)
    metrics = compute_metrics(output.labels, output.probs)
    score = metrics["balanced_accuracy"]
    is_best = score > state.best_score
    if is_best:
        state.best_weights = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        state.best_epoch, state.best_score, state.stale_epochs = epoch, score, 0
    else:
        state.stale_epochs += 1
    state.epoch = epoch
    train_loss, images = _total(stats.loss * stats.images, stats.images, cluster)
    if cluster.is_main:
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_balanced_accuracy %.4f%s",
                 epoch, settings.epochs, train_loss / max(images, 1), output.loss, score,
                 "  *" if is_best else "")
    return EpochResult(epoch=epoch, train_loss=train_loss / max(images, 1),
                       val_loss=output.loss, val=metrics, lr=lr,
                       epoch_seconds=time.perf_counter() - started,
                       train_images_per_second=images / max(stats.seconds, 1e-9),
                       is_best=is_best, best_epoch=state.best_epoch,
                       best_score=state.best_score)


def _total(loss_sum: float, count: int, cluster: Cluster) -> tuple[float, int]:
    """Sum of a loss and of images over all ranks (mean-reduce without the division)."""
    pieces = gather((loss_sum, count), cluster)
    return sum(p[0] for p in pieces), sum(p[1] for p in pieces)
