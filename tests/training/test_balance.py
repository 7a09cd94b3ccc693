"""Balance strategies: epoch orders and class weights, and their losses against the
textbook definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skinml.core.config import BalanceConfig
from skinml.training.balance import build_loss, class_weights, epoch_order

LABELS = np.repeat(np.arange(7), [20, 30, 60, 5, 60, 400, 8])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("strategy", ["none", "weighted_loss", "focal", "logit_adjust"])
def test_loss_side_strategies_visit_every_image_once(strategy):
    order = epoch_order(LABELS, BalanceConfig(strategy=strategy), gen())
    assert sorted(order) == list(range(len(LABELS)))


def test_oversample_replicates_minority_classes_to_the_ratio():
    order = epoch_order(LABELS, BalanceConfig(strategy="oversample", oversample_ratio=0.5), gen())
    counts = np.bincount(LABELS[order], minlength=7)
    assert counts.tolist() == [200, 200, 200, 200, 200, 400, 200]
    assert set(order) == set(range(len(LABELS)))  # every original image appears


def test_sampler_weights_follow_count_to_the_minus_alpha():
    config = BalanceConfig(strategy="sampler", alpha=1.0)
    draws = np.concatenate([epoch_order(LABELS, config, gen(s)) for s in range(40)])
    shares = np.bincount(LABELS[draws], minlength=7) / len(draws)
    np.testing.assert_allclose(shares, np.full(7, 1 / 7), atol=0.01)  # alpha=1: balanced


def test_class_weights_average_one_over_images():
    weights = class_weights(LABELS, alpha=0.5)
    counts = np.bincount(LABELS)
    assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert weights[3] > weights[5]  # rare df weighs more than common nv
    np.testing.assert_allclose(class_weights(LABELS, 0.0), np.ones(7))


def test_orders_are_reproducible_per_generator_seed():
    config = BalanceConfig(strategy="sampler")
    assert np.array_equal(epoch_order(LABELS, config, gen(3)), epoch_order(LABELS, config, gen(3)))
    assert not np.array_equal(epoch_order(LABELS, config, gen(3)),
                              epoch_order(LABELS, config, gen(4)))


# --- losses ---------------------------------------------------------------------------

LOSS_LABELS = np.repeat(np.arange(7), [10, 10, 20, 5, 20, 100, 5])
torch.manual_seed(0)
LOGITS = torch.randn(16, 7)
TARGET = torch.randint(0, 7, (16,))


def test_focal_with_gamma_zero_is_cross_entropy():
    loss = build_loss(BalanceConfig(strategy="focal", gamma=0.0), LOSS_LABELS)
    assert loss(LOGITS, TARGET).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item())


def test_focal_down_weights_confident_examples():
    easy = torch.zeros(4, 7)
    easy[:, 0] = 6.0
    target = torch.zeros(4, dtype=torch.long)
    focal = build_loss(BalanceConfig(strategy="focal", gamma=2.0), LOSS_LABELS)
    assert focal(easy, target) < 0.01 * F.cross_entropy(easy, target)


def test_weighted_loss_matches_weighted_cross_entropy():
    config = BalanceConfig(strategy="weighted_loss", alpha=1.0)
    loss = build_loss(config, LOSS_LABELS)
    counts = np.bincount(LOSS_LABELS).astype(float)
    weights = counts ** -1.0
    weights *= counts.sum() / (weights * counts).sum()
    expected = F.cross_entropy(LOGITS, TARGET, weight=torch.tensor(weights, dtype=torch.float32))
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_adjustment_adds_tau_log_prior():
    loss = build_loss(BalanceConfig(strategy="logit_adjust", tau=1.5), LOSS_LABELS)
    prior = torch.tensor(np.bincount(LOSS_LABELS) / len(LOSS_LABELS), dtype=torch.float32)
    expected = F.cross_entropy(LOGITS + 1.5 * prior.log(), TARGET)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["none", "weighted_loss", "focal", "logit_adjust"])
def test_soft_targets_equal_hard_targets_when_one_hot(strategy):
    loss = build_loss(BalanceConfig(strategy=strategy, focal_class_weights=True), LOSS_LABELS, 0.1)
    soft = F.one_hot(TARGET, 7).float()
    assert loss(LOGITS, soft).item() == pytest.approx(loss(LOGITS, TARGET).item(), rel=1e-5)
