"""Balance strategies: epoch orders and class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinml.balance import class_weights, epoch_order
from skinml.config import BalanceConfig

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
