"""Losses for the balance strategies, against their textbook definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinml.balance import build_loss
from skinml.config import BalanceConfig

LABELS = np.repeat(np.arange(7), [10, 10, 20, 5, 20, 100, 5])
torch.manual_seed(0)
LOGITS = torch.randn(16, 7)
TARGET = torch.randint(0, 7, (16,))


def test_focal_with_gamma_zero_is_cross_entropy():
    loss = build_loss(BalanceConfig(strategy="focal", gamma=0.0), LABELS)
    assert loss(LOGITS, TARGET).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item())


def test_focal_down_weights_confident_examples():
    easy = torch.zeros(4, 7)
    easy[:, 0] = 6.0
    target = torch.zeros(4, dtype=torch.long)
    focal = build_loss(BalanceConfig(strategy="focal", gamma=2.0), LABELS)
    assert focal(easy, target) < 0.01 * F.cross_entropy(easy, target)


def test_weighted_loss_matches_weighted_cross_entropy():
    config = BalanceConfig(strategy="weighted_loss", alpha=1.0)
    loss = build_loss(config, LABELS)
    counts = np.bincount(LABELS).astype(float)
    weights = counts ** -1.0
    weights *= counts.sum() / (weights * counts).sum()
    expected = F.cross_entropy(LOGITS, TARGET, weight=torch.tensor(weights, dtype=torch.float32))
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_adjustment_adds_tau_log_prior():
    loss = build_loss(BalanceConfig(strategy="logit_adjust", tau=1.5), LABELS)
    prior = torch.tensor(np.bincount(LABELS) / len(LABELS), dtype=torch.float32)
    expected = F.cross_entropy(LOGITS + 1.5 * prior.log(), TARGET)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["none", "weighted_loss", "focal", "logit_adjust"])
def test_soft_targets_equal_hard_targets_when_one_hot(strategy):
    loss = build_loss(BalanceConfig(strategy=strategy, focal_class_weights=True), LABELS, 0.1)
    soft = F.one_hot(TARGET, 7).float()
    assert loss(LOGITS, soft).item() == pytest.approx(loss(LOGITS, TARGET).item(), rel=1e-5)
