"""Metrics are sklearn's, on the 7 classes, with absent classes reported as NaN."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from skinml.core.labels import CLASSES
from skinml.evaluation.metrics import (
    balanced_accuracy,
    classification_report,
    compute_metrics,
    confusion,
    macro_auc,
    per_class_metrics,
    predictions,
)

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


@pytest.mark.parametrize("seed", range(20))
def test_the_bootstraps_balanced_accuracy_and_auc_equal_sklearns(seed):
    """What the lesion bootstrap calls a thousand times an interval, computed with bincounts
    and ranks: the same numbers as sklearn's, with ties and absent classes."""
    draw = np.random.default_rng(seed)
    n = int(draw.integers(5, 300))
    labels = draw.integers(0, 7 if seed % 2 else 4, n)
    probs = draw.dirichlet(np.ones(7), n)
    if seed % 3 == 0:
        probs = np.round(probs, 1)  # ties, in the argmax and in the ranks
    present = np.unique(labels)
    recall = [np.mean(predictions(probs)[labels == c] == c) for c in present]
    assert balanced_accuracy(labels, probs) == pytest.approx(np.mean(recall), abs=1e-12)
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present
            if 0 < (labels == c).sum() < n]
    if aucs:
        assert macro_auc(labels, probs) == pytest.approx(np.mean(aucs), abs=1e-12)


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


# --- agreement with the official ISIC challenge scorer (PyPI isic-challenge-scoring) ---

ISIC_ORDER = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
# isic-challenge-scoring 5.6.0 (the newest) calls DataFrame.applymap, which pandas 3 renamed
# to DataFrame.map (same behaviour); the alias lets the official code run unchanged.
SCORER_PANDAS_ALIAS = "import pandas; pandas.DataFrame.applymap = pandas.DataFrame.map"


@pytest.fixture(autouse=True)
def _scorer_runs_on_pandas_3(monkeypatch):
    import pandas as pd

    if not hasattr(pd.DataFrame, "applymap"):
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)


def official_score(labels: np.ndarray, probs: np.ndarray):
    import io

    import pandas as pd
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    from skinml.core.labels import CLASSES

    images = [f"ISIC_{i:07d}" for i in range(len(labels))]
    truth = pd.DataFrame({"image": images, **{c: (labels == CLASSES.index(c.lower()))
                                              .astype(float) for c in ISIC_ORDER}})
    prediction = pd.DataFrame({"image": images, **{c: probs[:, CLASSES.index(c.lower())]
                                                   for c in ISIC_ORDER}})
    return ClassificationScore.from_stream(io.StringIO(truth.to_csv(index=False)),
                                           io.StringIO(prediction.to_csv(index=False,
                                                                         float_format="%.17e")),
                                           ClassificationMetric.BALANCED_ACCURACY)


def adversarial_cases():
    rng = np.random.default_rng(7)
    labels = np.tile(np.arange(7), 30)
    random = rng.dirichlet(np.ones(7), len(labels))
    rounded = np.round(random, 1)  # many ties, some for the maximum
    uniform = np.full((len(labels), 7), 1 / 7)  # every row a 7-way tie
    one_hot = np.eye(7)[rng.integers(0, 7, len(labels))]
    half = np.where(rng.random((len(labels), 7)) < 0.5, 0.5, 0.25)  # exactly at p = 0.5
    skewed = rng.dirichlet(np.full(7, 0.05), len(labels))  # near-degenerate, very confident
    return {"random": (labels, random), "ties": (labels, rounded), "uniform": (labels, uniform),
            "one-hot": (labels, one_hot), "half": (labels, half), "skewed": (labels, skewed)}


@pytest.mark.parametrize("case", list(adversarial_cases()))
def test_metrics_equal_the_official_isic_scorer(case):
    from skinml.core.labels import CLASSES

    labels, probs = adversarial_cases()[case]
    official = official_score(labels, probs)
    ours = compute_metrics(labels, probs)
    table = per_class_metrics(labels, probs)
    assert ours["balanced_accuracy"] == pytest.approx(
        official.aggregate["balanced_accuracy"], abs=1e-9)
    assert ours["auc"] == pytest.approx(official.macro_average["auc"], abs=1e-9)
    assert ours["average_precision"] == pytest.approx(official.macro_average["ap"], abs=1e-9)
    per_category = official.per_category.set_index(official.per_category.index.str.lower())
    for column, theirs in [("auc", "auc"), ("average_precision", "ap"),
                           ("sensitivity_p50", "sensitivity"),
                           ("specificity_p50", "specificity")]:
        np.testing.assert_allclose(table.loc[list(CLASSES), column].to_numpy(),
                                   per_category.loc[list(CLASSES), theirs].to_numpy(),
                                   atol=1e-9, err_msg=column)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_data():
    from skinml.evaluation.metrics import balanced_accuracy, bootstrap_ci

    rng = np.random.default_rng(1)

    def sample(lesions: int):
        groups = np.repeat(np.arange(lesions), 2)  # two images per lesion
        labels = np.repeat(rng.integers(0, 7, lesions), 2)
        probs = rng.dirichlet(np.ones(7), len(labels))
        hit = rng.random(len(labels)) < 0.6
        probs[hit, labels[hit]] += 2
        return labels, probs / probs.sum(1, keepdims=True), groups

    widths = []
    for lesions in (60, 600):
        labels, probs, groups = sample(lesions)
        low, high = bootstrap_ci(labels, probs, groups, balanced_accuracy, n_boot=300)
        assert low <= balanced_accuracy(labels, probs) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_subgroup_table_sums_to_the_whole():
    import pandas as pd

    from skinml.evaluation.metrics import subgroup_metrics

    rng = np.random.default_rng(2)
    attributes = pd.DataFrame({"sex": rng.choice(["male", "female", "unknown"], 200),
                               "age_band": rng.choice(["<30", "30-49", ">=70"], 200)})
    table = subgroup_metrics(LABELS, PROBS, attributes)
    for _, groups in table.groupby("attribute"):
        assert groups["images"].sum() == len(LABELS)
        assert groups[[f"n_{c}" for c in CLASSES]].sum().sum() == len(LABELS)
    assert (table["small"] == (table["images"] < 30)).all()


def test_calibration_error_is_zero_for_calibrated_and_large_for_overconfident():
    from skinml.evaluation.metrics import expected_calibration_error

    labels = np.zeros(1000, dtype=int)
    confident = np.tile([[0.6] + [0.4 / 6] * 6], (1000, 1))
    labels[:400] = 1  # 60 % right at 60 % confidence: calibrated
    assert expected_calibration_error(labels, confident) == pytest.approx(0.0, abs=1e-9)
    overconfident = np.tile([[0.99] + [0.01 / 6] * 6], (1000, 1))
    assert expected_calibration_error(labels, overconfident) == pytest.approx(0.39, abs=1e-6)


def _two_models(lesions: int = 300, worse_on: int = 12):
    """Model B is model A made wrong on `worse_on` lesions that A gets right (all images)."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(lesions), rng.integers(1, 4, lesions))
    labels = np.repeat(np.arange(lesions) % 7, np.bincount(groups))
    right = np.repeat(rng.random(lesions) < 0.7, np.bincount(groups))
    probs_a = np.full((len(labels), 7), 0.05)
    probs_a[np.arange(len(labels)), np.where(right, labels, (labels + 1) % 7)] = 0.7
    spoiled = rng.choice(np.unique(groups[right]), worse_on, replace=False)
    probs_b = probs_a.copy()
    wrong = np.isin(groups, spoiled)
    probs_b[wrong] = 0.05
    probs_b[np.flatnonzero(wrong), (labels[wrong] + 1) % 7] = 0.7
    return labels, probs_a, probs_b, groups


def test_paired_bootstrap_brackets_the_true_difference_and_beats_the_unpaired_interval():
    from skinml.evaluation.metrics import (
        balanced_accuracy,
        bootstrap_ci,
        lesion_resamples,
        paired_balanced_accuracy,
    )

    labels, probs_a, probs_b, groups = _two_models()
    true_delta = balanced_accuracy(labels, probs_a) - balanced_accuracy(labels, probs_b)
    assert true_delta > 0.02
    paired = paired_balanced_accuracy(labels, probs_a, probs_b, groups, n_boot=1000, seed=0)
    assert paired.delta.value == pytest.approx(true_delta)
    assert 0 < paired.delta.low <= true_delta <= paired.delta.high
    # Each model's own interval is the ordinary lesion bootstrap on the same resamples.
    assert paired.a.value == pytest.approx(balanced_accuracy(labels, probs_a))
    low, high = bootstrap_ci(labels, probs_a, groups, balanced_accuracy, n_boot=1000, seed=0)
    assert (paired.a.low, paired.a.high) == pytest.approx((low, high))
    # Unpaired: the two models' scores from independent resamples of the lesions.
    unpaired = [balanced_accuracy(labels[a], probs_a[a]) - balanced_accuracy(labels[b], probs_b[b])
                for a, b in zip(lesion_resamples(groups, 1000, seed=1),
                                lesion_resamples(groups, 1000, seed=2), strict=True)]
    unpaired_low, unpaired_high = np.percentile(unpaired, [2.5, 97.5])
    assert unpaired_low < 0 < paired.delta.low  # only pairing sees the win
    assert paired.delta.high - paired.delta.low < (unpaired_high - unpaired_low) / 2
    assert paired.lesions == len(np.unique(groups)) and paired.images == len(labels)


def test_paired_bootstrap_of_a_model_with_itself_is_exactly_zero():
    from skinml.evaluation.metrics import paired_balanced_accuracy

    labels, probs_a, _, groups = _two_models()
    paired = paired_balanced_accuracy(labels, probs_a, probs_a, groups, n_boot=200)
    assert (paired.delta.value, paired.delta.low, paired.delta.high) == (0.0, 0.0, 0.0)


def test_paired_per_class_differences_are_where_the_models_differ():
    from skinml.evaluation.metrics import paired_balanced_accuracy

    labels, probs_a, probs_b, groups = _two_models()
    table = paired_balanced_accuracy(labels, probs_a, probs_b, groups, n_boot=300).per_class
    assert list(table.index) == list(CLASSES)
    assert (table["delta"] >= 0).all()
    assert table["delta"].mean() == pytest.approx(
        table["recall_a"].mean() - table["recall_b"].mean())
    assert (table["delta_low"] <= table["delta"]).all()
    assert (table["delta"] <= table["delta_high"]).all()
