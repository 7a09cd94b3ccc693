"""The training recipe's parts: one builder per piece a training step uses, the tools they
make, and the settings the epoch loop reads.

Nothing here decides what to build: the training workflow (`skinml.workflows.train`) calls
these builders in order and hands what they made to `engine.fit`, as torchvision's
`references/classification/train.py` does in its `main`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from skinml.core.config import AugmentConfig, BalanceConfig, Config, OptimConfig
from skinml.data.augment import TrainAugment
from skinml.data.preprocess import Preprocess
from skinml.training.balance import epoch_order
from skinml.training.device import Precision
from skinml.training.distributed import Cluster, shard


@dataclass(frozen=True)
class StepTools:
    """What a training step needs besides the model and the batch."""

    augment: TrainAugment
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    memory_format: torch.memory_format
    ema: AveragedModel | None
    grad_clip: float


@dataclass(frozen=True)
class LoopSettings:
    """What the epoch loop reads from a config, and nothing else (no paths, no tracking)."""

    epochs: int
    batch_size: int
    balance: BalanceConfig  # each epoch's sample order
    preprocess: Preprocess  # how validation images become network input
    early_stopping_patience: int = 0
    seed: int = 0
    compile: bool = False
    progress: bool = False

    @classmethod
    def from_config(cls, config: Config) -> LoopSettings:
        optim, runtime = config.optim, config.runtime
        return cls(optim.epochs, optim.batch_size, config.balance, preprocess_of(config),
                   optim.early_stopping_patience, runtime.seed, runtime.compile,
                   runtime.progress)


def preprocess_of(config: Config) -> Preprocess:
    return Preprocess(config.model.image_size, config.model.crop_pct)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch: a resumed run draws exactly what it would have."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def steps_per_epoch(train_labels: np.ndarray, balance: BalanceConfig, batch_size: int,
                    seed: int, cluster: Cluster) -> int:
    """Optimiser steps in one epoch of this process's shard (what the schedule counts)."""
    order = epoch_order(train_labels, balance, epoch_generator(seed, 0))
    return max(1, len(shard(order, cluster)) // batch_size)


def build_augment(augment: AugmentConfig, preprocess: Preprocess) -> TrainAugment:
    return TrainAugment(augment, preprocess.image_size, preprocess.crop_pct)


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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero, stepped every batch.

    One closed-form LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): the same
    curve, but its state is one step count, so a resumed run lands on exactly the same
    learning rates (the chained form recomputes them incrementally).
    """
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = max(cfg.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights (and buffers), or None when off.

    The copy is taken from `model` as it is now: put the model on its device first.
    """
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
