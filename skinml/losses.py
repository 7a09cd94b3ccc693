"""Training losses for the balance strategies; all accept hard labels or soft (mixup) targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skinml.data.balance import class_counts, class_weights

if TYPE_CHECKING:
    from skinml.config import BalanceConfig


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
