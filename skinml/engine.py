"""The training engine: epoch loops, optimisation, checkpoints. Knows nothing of MLflow or Optuna.

Progress leaves through a callback (`on_epoch_end`), so tracking and pruning hook in
without touching the loop. Optional features (AMP scaler, EMA, compile) are None or off
when unused and checked once, never inside the batch loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from skinml.config import Config, OptimConfig
from skinml.data.augment import EvalTransform, TrainAugment
from skinml.data.balance import epoch_order
from skinml.data.loader import CachedBatches
from skinml.distributed import SINGLE, Cluster, gather, shard, sync_buffers, wrap
from skinml.losses import build_loss
from skinml.metrics import compute_metrics

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class StepTools:
    """What a training step needs besides the model and the batch."""

    augment: TrainAugment
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None
    ema: AveragedModel | None = None
    grad_clip: float = 0.0
    channels_last: bool = False


@dataclass(frozen=True)
class TrainStats:
    loss: float
    images: int
    seconds: float


@dataclass(frozen=True)
class EvalOutput:
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


@dataclass
class TrainingState:
    """Everything a checkpoint holds, as plain state dicts (safe with weights_only=True)."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FitResult:
    best_weights: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, Any]]
    stopped_early: bool


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device: torch.device, amp: str
                 ) -> tuple[Callable[[], contextlib.AbstractContextManager],
                            torch.amp.GradScaler | None]:
    """Autocast context factory and GradScaler (fp16 only) for `runtime.amp`."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else (
            "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp == "off":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-d parameters), as timm and vision do."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": lambda model, cfg: torch.optim.AdamW(_param_groups(model, cfg.weight_decay),
                                                  lr=cfg.lr),
    "sgd": lambda model, cfg: torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                              momentum=cfg.momentum, nesterov=True),
}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero, stepped every batch."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = max(cfg.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    tools: StepTools, total: int | None = None, progress: bool = False
                    ) -> TrainStats:
    """One pass over `batches`; returns the mean training loss and throughput."""
    model.train()
    started, seen, loss_sum = time.perf_counter(), 0, torch.zeros(())
    # disable=None: tqdm draws only on a terminal, so logs in files get no bar redraws.
    bar = tqdm(batches, total=total, desc="train", unit="batch", leave=False,
               disable=None if progress else True)
    for images, labels in bar:
        inputs, targets = tools.augment(images, labels)
        if tools.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with tools.autocast():
            loss = tools.loss_fn(model(inputs), targets)
        tools.optimizer.zero_grad(set_to_none=True)
        if tools.scaler is not None:
            tools.scaler.scale(loss).backward()
            tools.scaler.unscale_(tools.optimizer)
        else:
            loss.backward()
        if tools.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), tools.grad_clip)
        if tools.scaler is not None:
            tools.scaler.step(tools.optimizer)
            tools.scaler.update()
        else:
            tools.optimizer.step()
        tools.scheduler.step()
        if tools.ema is not None:
            tools.ema.update_parameters(model)
        loss_sum += loss.detach().float().cpu() * len(images)
        seen += len(images)
    _synchronize(model)
    return TrainStats(float(loss_sum) / max(seen, 1), seen, time.perf_counter() - started)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             transform: EvalTransform, autocast: Callable[[], contextlib.AbstractContextManager]
             = contextlib.nullcontext, channels_last: bool = False) -> EvalOutput:
    """Softmax probabilities, labels and mean cross-entropy over `batches`."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for images, targets in batches:
        inputs = transform(images)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(inputs).float()
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        probs.append(logits.softmax(1).cpu().numpy())
        labels.append(targets.cpu().numpy())
    labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return EvalOutput(np.concatenate(probs) if probs else np.zeros((0, 0)), labels_all,
                      loss_sum / max(len(labels_all), 1))


def fit(model: nn.Module, train: CachedBatches, val: CachedBatches, config: Config,
        checkpoint: Path, on_epoch_end: Callable[[EpochResult], None] | None = None,
        resume: bool = False, cluster: Cluster = SINGLE) -> FitResult:
    """Train for `config.optim.epochs` (or until early stopping), checkpointing every epoch.

    With `resume`, training continues from `checkpoint` and ends exactly where an
    uninterrupted run would: each epoch's randomness is seeded from (seed, epoch). Under
    torchrun each rank trains on its shard; only rank 0 writes the checkpoint.
    """
    device, optim = train.device, config.optim
    model.to(device)
    if config.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    first_order = epoch_order(train.labels, config.balance, _generator(config, 0))
    steps = max(1, len(shard(first_order, cluster)) // optim.batch_size)
    autocast, scaler = autocast_for(device, config.runtime.amp)
    optimizer = OPTIMIZERS[optim.optimizer](model, optim)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(optim.ema_decay),
                         use_buffers=True) if optim.ema_decay else None)
    tools = StepTools(
        augment=TrainAugment(config.augment, config.model.image_size, config.model.crop_pct),
        loss_fn=build_loss(config.balance, train.labels, optim.label_smoothing).to(device),
        optimizer=optimizer, scheduler=build_scheduler(optimizer, optim, steps),
        autocast=autocast, scaler=scaler, ema=ema, grad_clip=optim.grad_clip,
        channels_last=config.runtime.channels_last)
    state = TrainingState()
    if resume:
        state = load_checkpoint(checkpoint, model, tools)
        log.info("resumed from %s after epoch %d", checkpoint, state.epoch)
    runner = wrap(model, cluster, device)
    runner = torch.compile(runner) if config.runtime.compile else runner
    transform = EvalTransform(config.model.image_size, config.model.crop_pct).to(device)
    stopped_early = False
    for epoch in range(state.epoch + 1, optim.epochs + 1):
        result = _run_epoch(runner, model, (train, val), tools, transform, state, epoch,
                            config, cluster)
        # Report before checkpointing: a crash in between repeats an epoch's (identical)
        # metrics on resume instead of losing them.
        if on_epoch_end is not None:
            on_epoch_end(result)
        if cluster.is_main:
            save_checkpoint(checkpoint, model, tools, state, config)
        patience = optim.early_stopping_patience
        if patience and state.stale_epochs >= patience and epoch < optim.epochs:
            log.info("early stopping after epoch %d: no val gain for %d epochs", epoch, patience)
            stopped_early = True
            break
    return FitResult(state.best_weights, state.best_epoch, state.best_score, state.history,
                     stopped_early)


def _run_epoch(runner: nn.Module, model: nn.Module,
               data: tuple[CachedBatches, CachedBatches], tools: StepTools,
               transform: EvalTransform, state: TrainingState, epoch: int, config: Config,
               cluster: Cluster) -> EpochResult:
    started = time.perf_counter()
    train, val = data
    generator = _generator(config, epoch)
    epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    order = shard(epoch_order(train.labels, config.balance, generator), cluster)
    seed_everything(epoch_seed + cluster.rank)  # each rank its own augmentations
    steps = max(1, len(order) // config.optim.batch_size)
    lr = tools.optimizer.param_groups[0]["lr"]
    stats = train_one_epoch(runner, train.epoch(order, drop_last=True), tools, total=steps,
                            progress=config.runtime.progress and cluster.is_main)
    # Evaluate the plain module: DDP's forward would sync buffers across uneven shards.
    scored = tools.ema.module if tools.ema is not None else model
    sync_buffers(scored, cluster)
    output = evaluate_split(scored, val, transform, tools, cluster)
    metrics = compute_metrics(output.labels, output.probs)
    score = metrics["balanced_accuracy"]
    is_best = score > state.best_score
    if is_best:
        source = tools.ema.module if tools.ema is not None else model
        state.best_weights = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
        state.best_epoch, state.best_score, state.stale_epochs = epoch, score, 0
    else:
        state.stale_epochs += 1
    state.epoch = epoch
    train_loss, images = _total(stats.loss * stats.images, stats.images, cluster)
    result = EpochResult(epoch=epoch, train_loss=train_loss / max(images, 1),
                         val_loss=output.loss, val=metrics, lr=lr,
                         epoch_seconds=time.perf_counter() - started,
                         train_images_per_second=images / max(stats.seconds, 1e-9),
                         is_best=is_best, best_epoch=state.best_epoch,
                         best_score=state.best_score)
    state.history.append({"epoch": epoch, "train_loss": result.train_loss,
                          "val_loss": output.loss, **{f"val_{k}": v for k, v in metrics.items()}})
    if cluster.is_main:
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_balanced_accuracy %.4f%s",
                 epoch, config.optim.epochs, result.train_loss, output.loss, score,
                 "  *" if is_best else "")
    return result


def evaluate_split(model: nn.Module, batches: CachedBatches, transform: EvalTransform,
                   tools: StepTools | None = None, cluster: Cluster = SINGLE) -> EvalOutput:
    """`evaluate` over a whole split; under torchrun each rank takes a share, then all gather.

    The result is identical on every rank and covers every image exactly once.
    """
    positions = np.arange(len(batches))[cluster.rank::cluster.world_size]
    autocast = tools.autocast if tools is not None else contextlib.nullcontext
    channels_last = tools.channels_last if tools is not None else False
    part = evaluate(model, batches.epoch(positions), transform, autocast, channels_last)
    pieces = gather((positions, part.probs, part.labels, part.loss * len(part.labels)), cluster)
    order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
    probs = np.concatenate([p[1] for p in pieces if len(p[1])])[order]
    labels = np.concatenate([p[2] for p in pieces])[order]
    return EvalOutput(probs, labels, sum(p[3] for p in pieces) / max(len(labels), 1))


def _total(loss_sum: float, count: int, cluster: Cluster) -> tuple[float, int]:
    """Sum of a loss and of images over all ranks (mean-reduce without the division)."""
    pieces = gather((loss_sum, count), cluster)
    return sum(p[0] for p in pieces), sum(p[1] for p in pieces)


def _generator(config: Config, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.runtime.seed * 100_003 + epoch)


def save_checkpoint(path: Path, model: nn.Module, tools: StepTools, state: TrainingState,
                    config: Config) -> None:
    """Write the checkpoint atomically: a crash mid-write leaves the previous one intact."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": tools.optimizer.state_dict(),
        "scheduler": tools.scheduler.state_dict(),
        "scaler": tools.scaler.state_dict() if tools.scaler is not None else None,
        "ema": tools.ema.state_dict() if tools.ema is not None else None,
        "state": {"epoch": state.epoch, "best_epoch": state.best_epoch,
                  "best_score": state.best_score, "best_weights": state.best_weights,
                  "stale_epochs": state.stale_epochs, "history": state.history},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, tools: StepTools) -> TrainingState:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    tools.optimizer.load_state_dict(payload["optimizer"])
    tools.scheduler.load_state_dict(payload["scheduler"])
    if tools.scaler is not None and payload["scaler"] is not None:
        tools.scaler.load_state_dict(payload["scaler"])
    if tools.ema is not None and payload["ema"] is not None:
        tools.ema.load_state_dict(payload["ema"])
    return TrainingState(**payload["state"])


def _synchronize(model: nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        torch.cuda.synchronize(parameter.device)
