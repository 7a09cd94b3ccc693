"""Class balancing on the data side: each epoch's sample order for a balance strategy.

`oversample` replicates minority-class images toward `oversample_ratio` x the largest
class (the seed project's approach, done with indices instead of copied files);
`sampler` draws with replacement with weights proportional to class_count^-alpha.
The loss-side strategies (weighted_loss, focal, logit_adjust) see every image once.
Which strategy uses which order is `skinml.strategies.STRATEGIES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from skinml.labels import NUM_CLASSES

if TYPE_CHECKING:
    from skinml.config import BalanceConfig


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
