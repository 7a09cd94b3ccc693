"""Temperature scaling on a constructed over-confident model."""

from __future__ import annotations

import numpy as np
import pytest

from skinml.evaluation.calibration import apply_temperature, clamp_warning, fit_temperature
from skinml.evaluation.metrics import (
    expected_calibration_error,
    negative_log_likelihood,
    predictions,
)


def overconfident(n: int = 4000, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(z), probabilities reported as softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 7))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(7, p=p) for p in true])
    sharp = np.exp(sharpen * logits)
    return labels, sharp / sharp.sum(1, keepdims=True)


def test_temperature_scaling_lowers_nll_and_finds_the_sharpening():
    labels, probs = overconfident()
    temperature = fit_temperature(probs, labels)
    calibrated = apply_temperature(probs, temperature)
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert negative_log_likelihood(labels, calibrated) < negative_log_likelihood(labels, probs)
    assert expected_calibration_error(labels, calibrated) < expected_calibration_error(
        labels, probs) / 3
    assert (predictions(calibrated) == predictions(probs)).all()  # no decision changes


def test_temperature_one_changes_nothing():
    labels, probs = overconfident(n=100)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_a_temperature_at_either_limit_is_named_and_explained():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    confident_noise = np.full((500, 7), 0.01)
    confident_noise[np.arange(500), rng.integers(0, 7, 500)] = 0.94  # sure, and random
    upper = fit_temperature(confident_noise, labels)
    assert upper == 20.0 and "upper limit" in clamp_warning(upper)
    assert "lower limit" in clamp_warning(0.05)
    assert clamp_warning(1.3) is None
