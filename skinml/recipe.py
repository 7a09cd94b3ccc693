"""The training recipe: the settings `fit` reads, and the step tools built from them.

`build_step_tools` is the one place a training step's augmentation, loss, optimiser,
learning-rate schedule, precision and EMA are made; `fit` and `skinml bench train` both
use it, so the benchmark measures the step that trains.
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

from skinml.balance import build_loss
from skinml.config import AugmentConfig, BalanceConfig, Config, OptimConfig
from skinml.data.augment import TrainAugment
from skinml.data.preprocess import Preprocess
from skinml.device import Precision, precision_for


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop reads from a config, and nothing else (no paths, no tracking)."""

    optim: OptimConfig
    balance: BalanceConfig
    augment: AugmentConfig
    preprocess: Preprocess
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    progress: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @classmethod
    def from_config(cls, config: Config) -> TrainSettings:
        runtime = config.runtime
        return cls(config.optim, config.balance, config.augment,
                   Preprocess(config.model.image_size, config.model.crop_pct), runtime.amp,
                   runtime.channels_last, runtime.compile, runtime.seed, runtime.progress)


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


def build_step_tools(model: nn.Module, labels: np.ndarray, settings: TrainSettings,
                     device: torch.device, steps_per_epoch: int) -> StepTools:
    """Everything around the model for training it on `labels` (the train split's).

    The model must already be on `device`: the EMA copy is taken from it here.
    """
    optim = settings.optim
    optimizer = OPTIMIZERS[optim.optimizer](model, optim)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(optim.ema_decay),
                         use_buffers=True) if optim.ema_decay else None)
    return StepTools(
        augment=build_augment(settings).to(device),
        loss_fn=build_loss(settings.balance, labels, optim.label_smoothing).to(device),
        optimizer=optimizer, scheduler=build_scheduler(optimizer, optim, steps_per_epoch),
        precision=precision_for(device, settings.amp), memory_format=settings.memory_format,
        ema=ema, grad_clip=optim.grad_clip)


def build_augment(settings: TrainSettings) -> TrainAugment:
    return TrainAugment(settings.augment, settings.preprocess.image_size,
                        settings.preprocess.crop_pct)


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
