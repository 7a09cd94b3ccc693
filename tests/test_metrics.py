"""Metrics are sklearn's, on the 7 classes, with absent classes reported as NaN."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from skinml.metrics import classification_report, compute_metrics, confusion, per_class_metrics

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 7, 200)
PROBS = rng.dirichlet(np.ones(7), 200)
PROBS[np.arange(100), LABELS[:100]] += 1  # half the rows lean to the truth
PROBS /= PROBS.sum(1, keepdims=True)


def test_balanced_accuracy_is_mean_recall():
    scores = compute_metrics(LABELS, PROBS)
    assert scores["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(LABELS, PROBS.argmax(1)))
    assert scores["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS, multi_class="ovr"))


def test_absent_class_gives_nan_not_a_crash():
    keep = LABELS != 3
    table = per_class_metrics(LABELS[keep], PROBS[keep])
    assert np.isnan(table.loc["df", "auc"]) and table.loc["df", "support"] == 0
    assert np.isfinite(compute_metrics(LABELS[keep], PROBS[keep])["auc"])


def test_confusion_rows_normalise_to_one():
    matrix = confusion(LABELS, PROBS, normalize=True)
    np.testing.assert_allclose(matrix.sum(1), 1.0)
    assert confusion(LABELS, PROBS).sum() == 200


def test_report_names_the_classes():
    report = classification_report(LABELS, PROBS)
    assert "akiec" in report and "vasc" in report
    assert set(classification_report(LABELS, PROBS, as_dict=True)) >= {"mel", "macro avg"}
