"""A study's verdict on constructed trials: equal to the base config is no evidence; clearly
better on the same images is better, with the paired interval above 0."""

from __future__ import annotations

import numpy as np

from skinml.evaluation.metrics import Interval, paired_balanced_accuracy
from skinml.workflows.tuning.verdict import verdict_line

RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(7), 30)
LESIONS = np.arange(len(LABELS)) // 2  # two images per lesion


def one_hot(predicted: np.ndarray) -> np.ndarray:
    return np.eye(7)[predicted]


def noisy(right: float) -> np.ndarray:
    """Predictions right for a share `right` of the images, a random class otherwise."""
    predicted = np.where(RNG.random(len(LABELS)) < right, LABELS,
                         RNG.integers(0, 7, len(LABELS)))
    return one_hot(predicted)


def test_a_best_trial_equal_to_the_base_config_is_no_evidence():
    base = noisy(0.5)
    delta = paired_balanced_accuracy(LABELS, base, base, LESIONS, n_boot=500, seed=0).delta
    assert delta.value == 0 and delta.low <= 0 <= delta.high
    assert verdict_line(13, delta).endswith(": no evidence of improvement")


def test_a_clearly_better_best_trial_is_better_with_the_interval_above_zero():
    delta = paired_balanced_accuracy(LABELS, noisy(0.9), noisy(0.3), LESIONS, n_boot=500,
                                     seed=0).delta
    assert delta.low > 0
    line = verdict_line(2, delta)
    assert line.startswith("best trial 2 vs base config: Δ balanced accuracy +")
    assert line.endswith(": better than the base config")


def test_a_clearly_worse_one_says_so():
    assert verdict_line(0, Interval(-0.2, -0.3, -0.1)).endswith(": worse than the base config")
