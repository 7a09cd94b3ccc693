"""Class balancing, one module: each strategy is an epoch sample order plus a loss.

`oversample` replicates minority-class images toward `oversample_ratio` x the largest
class (indices, not copied files); `sampler` draws with replacement with weights
proportional to class_count^-alpha. The loss-side strategies (weighted_loss, focal,
logit_adjust) see every image once and reweigh in the loss. Adding a strategy is one entry
in `STRATEGIES`; `balance.strategy` in the config, its error message and `skinml tune`'s
search-space checks all read their choices from it. All losses accept hard labels or soft
(mixup) targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skinml.core.config import BalanceConfig
from skinml.core.labels import NUM_CLASSES

# Epoch orders: positions into the train labels to visit in one epoch.

def class_counts(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)


def class_weights(labels: np.ndarray, alpha: float) -> np.ndarray:
    """Per-class weights proportional to count^-alpha, averaging 1 over the images.

    alpha=1 weighs every class equally in total; alpha=0 is no reweighting. Classes with no
    images get weight 0.
    """
    counts = class_counts(labels).astype(np.float64)
    weights = np.where(counts > 0, np.maximum(counts, 1) ** -alpha, 0.0)
    return weights * counts.sum() / (weights * counts).sum()


def shuffled(labels: np.ndarray, config: BalanceConfig, generator: torch.Generator) -> np.ndarray:
    return torch.randperm(len(labels), generator=generator).numpy()


def oversampled(labels: np.ndarray, config: BalanceConfig,
                 generator: torch.Generator) -> np.ndarray:
    counts = class_counts(labels)
    target = int(round(config.oversample_ratio * counts.max()))
    picks = []
    for cls in np.flatnonzero(counts):
        members = np.flatnonzero(labels == cls)
        wanted = max(len(members), target)
        copies, extra = divmod(wanted, len(members))
        chosen = torch.randperm(len(members), generator=generator)[:extra].numpy()
        picks += [np.tile(members, copies), members[chosen]]
    order = np.concatenate(picks)
    return order[torch.randperm(len(order), generator=generator).numpy()]


def weighted_draws(labels: np.ndarray, config: BalanceConfig,
                    generator: torch.Generator) -> np.ndarray:
    weights = torch.as_tensor(class_weights(labels, config.alpha)[labels])
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator).numpy()


# Losses.

def _soft_targets(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    if target.ndim == 1:
        target = F.one_hot(target, num_classes).float()
    return target * (1 - smoothing) + smoothing / num_classes


class CrossEntropy(nn.Module):
    """Cross-entropy with optional class weights and label smoothing.

    Hard and soft (mixup) targets share one weighted mean, sum(w * loss) / sum(w * target):
    F.cross_entropy divides by the weights for hard labels but by the batch size for
    probability targets, which would change the loss scale whenever mixing is on.
    """

    weight: torch.Tensor | None  # a buffer

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        soft = _soft_targets(target, logits.shape[1], self.label_smoothing)
        if self.weight is None:
            return -(soft * log_p).sum(1).mean()
        return -(soft * log_p * self.weight).sum() / (soft * self.weight).sum()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): down-weights easy examples by (1 - p)^gamma."""

    weight: torch.Tensor | None  # a buffer

    def __init__(self, gamma: float, weight: torch.Tensor | None, label_smoothing: float) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        soft = _soft_targets(target, logits.shape[1], self.label_smoothing)
        per_class = -soft * (1 - log_p.exp()) ** self.gamma * log_p
        if self.weight is None:
            return per_class.sum(1).mean()
        # Weighted mean, normalised like F.cross_entropy's weighted reduction.
        return (per_class * self.weight).sum() / (soft * self.weight).sum()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021): train on logits + tau*log(prior).

    Only the loss sees the shift, so the model's raw logits are Bayes-consistent for
    balanced error and predictions need no post-hoc correction.
    """

    shift: torch.Tensor  # a buffer

    def __init__(self, prior: torch.Tensor, tau: float, label_smoothing: float) -> None:
        super().__init__()
        self.register_buffer("shift", tau * torch.log(prior.clamp_min(1e-12)))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.shift, target,
                               label_smoothing=self.label_smoothing)


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def plain_loss(config: BalanceConfig, labels: np.ndarray, smoothing: float) -> nn.Module:
    return CrossEntropy(None, smoothing)


def weighted_loss(config: BalanceConfig, labels: np.ndarray, smoothing: float) -> nn.Module:
    return CrossEntropy(_tensor(class_weights(labels, config.alpha)), smoothing)


def focal_loss(config: BalanceConfig, labels: np.ndarray, smoothing: float) -> nn.Module:
    weights = _tensor(class_weights(labels, config.alpha)) if config.focal_class_weights else None
    return FocalLoss(config.gamma, weights, smoothing)


def logit_adjusted_loss(config: BalanceConfig, labels: np.ndarray, smoothing: float
                        ) -> nn.Module:
    return LogitAdjustedLoss(_tensor(class_counts(labels) / len(labels)), config.tau, smoothing)


# The registry.

EpochOrder = Callable[[np.ndarray, BalanceConfig, torch.Generator], np.ndarray]
LossBuilder = Callable[[BalanceConfig, np.ndarray, float], nn.Module]


@dataclass(frozen=True)
class Strategy:
    order: EpochOrder  # positions into the train labels to visit in one epoch
    loss: LossBuilder  # (config, train labels, label smoothing) -> loss module


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(shuffled, plain_loss),
    "oversample": Strategy(oversampled, plain_loss),
    "sampler": Strategy(weighted_draws, plain_loss),
    "weighted_loss": Strategy(shuffled, weighted_loss),
    "focal": Strategy(shuffled, focal_loss),
    "logit_adjust": Strategy(shuffled, logit_adjusted_loss),
}


def epoch_order(labels: np.ndarray, config: BalanceConfig,
                generator: torch.Generator) -> np.ndarray:
    """Positions into `labels` to visit this epoch, per `config.strategy`."""
    return STRATEGIES[config.strategy].order(labels, config, generator)


def build_loss(config: BalanceConfig, train_labels: np.ndarray,
               label_smoothing: float = 0.0) -> nn.Module:
    """The training loss for `config.strategy`, fitted to the training labels."""
    return STRATEGIES[config.strategy].loss(config, train_labels, label_smoothing)
