"""Class-balancing strategies, one registry: each is an epoch sample order plus a loss.

Adding a strategy is one line here; `balance.strategy` in the config, its error message
and `skinml tune`'s search-space checks all read their choices from `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from skinml.data import balance
from skinml.losses import focal_loss, logit_adjusted_loss, plain_loss, weighted_loss

if TYPE_CHECKING:
    from skinml.config import BalanceConfig

EpochOrder = Callable[[np.ndarray, "BalanceConfig", torch.Generator], np.ndarray]
LossBuilder = Callable[["BalanceConfig", np.ndarray, float], nn.Module]


@dataclass(frozen=True)
class Strategy:
    order: EpochOrder  # positions into the train labels to visit in one epoch
    loss: LossBuilder  # (config, train labels, label smoothing) -> loss module


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(balance.shuffled, plain_loss),
    "oversample": Strategy(balance.oversampled, plain_loss),
    "sampler": Strategy(balance.weighted_draws, plain_loss),
    "weighted_loss": Strategy(balance.shuffled, weighted_loss),
    "focal": Strategy(balance.shuffled, focal_loss),
    "logit_adjust": Strategy(balance.shuffled, logit_adjusted_loss),
}


def epoch_order(labels: np.ndarray, config: BalanceConfig,
                generator: torch.Generator) -> np.ndarray:
    """Positions into `labels` to visit this epoch, per `config.strategy`."""
    return STRATEGIES[config.strategy].order(labels, config, generator)


def build_loss(config: BalanceConfig, train_labels: np.ndarray,
               label_smoothing: float = 0.0) -> nn.Module:
    """The training loss for `config.strategy`, fitted to the training labels."""
    return STRATEGIES[config.strategy].loss(config, train_labels, label_smoothing)
