"""Batched on-device augmentation: per-image randomness, and the eval view without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from skinml.core.config import AugmentConfig
from skinml.data.augment import TrainAugment
from skinml.data.preprocess import EvalTransform

torch.manual_seed(0)
IMAGES = torch.randint(0, 256, (6, 48, 64, 3), dtype=torch.uint8)
LABELS = torch.arange(6) % 7
STILL = AugmentConfig(scale_min=1.0, scale_max=1.0, ratio_min=1.0, ratio_max=1.0,
                      hflip=False, vflip=False, rotation=0.0, brightness=0.0, contrast=0.0,
                      saturation=0.0, hue=0.0)


def test_train_output_shape_and_per_image_randomness():
    out, labels = TrainAugment(AugmentConfig(), 32, 0.875)(IMAGES[:1].repeat(6, 1, 1, 1), LABELS)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(labels, LABELS)
    # the same image six times comes out six different ways
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == 6


def test_without_randomness_training_sees_the_eval_view_of_a_square_image():
    square = IMAGES[:, :48, :48]
    augmented, _ = TrainAugment(STILL, 32, 1.0)(square, LABELS)
    evaluated = EvalTransform(32, 1.0)(square)
    assert torch.allclose(augmented, evaluated, atol=1e-4)


def test_horizontal_flip_only_mirrors():
    config = dataclasses.replace(STILL, hflip=True)
    square = IMAGES[:, :32, :32]
    torch.manual_seed(1)
    out, _ = TrainAugment(config, 32, 1.0)(square, LABELS)
    plain = EvalTransform(32, 1.0)(square)
    for o, p in zip(out, plain, strict=True):
        assert torch.allclose(o, p, atol=1e-4) or torch.allclose(o, p.flip(-1), atol=1e-4)


def test_colour_jitter_keeps_values_in_range():
    config = dataclasses.replace(STILL, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
    out, _ = TrainAugment(config, 32, 1.0)(IMAGES, LABELS)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = out * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixing_returns_soft_targets(mix):
    config = dataclasses.replace(AugmentConfig(), **mix)
    _, targets = TrainAugment(config, 32, 0.875)(IMAGES, LABELS)
    assert targets.shape == (6, 7)
    assert torch.allclose(targets.sum(1), torch.ones(6))
