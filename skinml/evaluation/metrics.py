"""Classification metrics: numpy arrays in, plain dicts and tables out (sklearn computes them).

Balanced accuracy (mean per-class recall) is the ISIC 2018 Task 3 metric and the one runs
are compared by; AUC and average precision are one-vs-rest per class, macro-averaged over
the classes present in the labels. The conventions follow the official ISIC challenge
scorer (tests compare with it): a tie for the highest probability is no prediction (never
right), and per-class sensitivity/specificity use p > 0.5.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm

from skinml.core.labels import CLASSES, NUM_CLASSES

_ALL = list(range(NUM_CLASSES))


UNDECIDED = -1  # a row whose highest probability is shared by several classes


def predictions(probs: np.ndarray) -> np.ndarray:
    """Predicted class per row; UNDECIDED where the maximum is tied (the ISIC convention)."""
    probs = np.asarray(probs)
    predicted = probs.argmax(axis=1)
    tied = (probs == probs.max(axis=1, keepdims=True)).sum(axis=1) > 1
    return np.where(tied, UNDECIDED, predicted)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, table: pd.DataFrame | None = None
                    ) -> dict[str, float]:
    """Scalar metrics of a split: balanced_accuracy, accuracy, macro_f1, auc, average_precision.

    `table` is per_class_metrics of the same arrays, when the caller has it already.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    predicted = predictions(probs)
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent classes: sklearn warns, we report NaN
        table = per_class_metrics(labels, probs) if table is None else table
        return {
            "balanced_accuracy": balanced_accuracy(labels, probs),
            "accuracy": float(skm.accuracy_score(labels, predicted)),
            "macro_f1": float(skm.f1_score(labels, predicted, labels=present, average="macro",
                                           zero_division=0)),
            "auc": float(np.nanmean(table["auc"])) if table["auc"].notna().any() else np.nan,
            "average_precision": (float(np.nanmean(table["average_precision"]))
                                  if table["average_precision"].notna().any() else np.nan),
        }


def per_class_metrics(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """One row per class: precision, recall, f1, support, auc, average_precision."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions(probs), labels=_ALL, zero_division=0)
    auc, ap, sensitivity, specificity = [], [], [], []
    for cls in _ALL:
        positive = labels == cls
        above = probs[:, cls] > 0.5
        # undefined when a side is empty: 1.0, as the ISIC scorer counts it
        sensitivity.append(float(above[positive].mean()) if positive.any() else 1.0)
        specificity.append(float((~above[~positive]).mean()) if (~positive).any() else 1.0)
        if positive.all() or not positive.any():
            auc.append(np.nan)
            ap.append(np.nan)
            continue
        auc.append(skm.roc_auc_score(positive, probs[:, cls]))
        ap.append(skm.average_precision_score(positive, probs[:, cls]))
    return pd.DataFrame({"precision": precision, "recall": recall, "f1": f1,
                         "support": support, "auc": auc, "average_precision": ap,
                         "sensitivity_p50": sensitivity, "specificity_p50": specificity},
                        index=pd.Index(CLASSES, name="class"))


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per confidence bin, weighted by bin size."""
    table = reliability(labels, probs, bins)
    return float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum()
                 / max(len(labels), 1))


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per confidence bin: count, mean confidence and accuracy of the top-label prediction."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        chosen = which == b
        rows.append({"low": edges[b], "high": edges[b + 1], "count": int(chosen.sum()),
                     "confidence": float(confidence[chosen].mean()) if chosen.any() else 0.0,
                     "accuracy": float(correct[chosen].mean()) if chosen.any() else 0.0})
    return pd.DataFrame(rows)


def lesion_resamples(groups: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of `n_boot` bootstrap samples, each drawing whole groups with replacement.

    Groups are lesions: images of one lesion are not independent, so resampling images
    would make every interval too narrow.
    """
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(group_index, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(group_index))[:-1])
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                 statistic, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile confidence interval of `statistic(labels, probs)`, resampling lesions."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    return _resampled_interval(lambda rows: statistic(labels[rows], probs[rows]), groups,
                               n_boot, level, seed)


def fold_mean_balanced_accuracy(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray
                                ) -> float:
    """The mean over folds of each fold's balanced accuracy (what a CV study optimises)."""
    return float(np.mean([balanced_accuracy(labels[folds == f], probs[folds == f])
                          for f in np.unique(folds)]))


def fold_mean_ci(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray, groups: np.ndarray,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Lesion-bootstrap CI of `fold_mean_balanced_accuracy` over out-of-fold predictions.

    Folds are lesion-disjoint, so a resample of the whole set's lesions keeps every image in
    its own fold.
    """
    labels, probs, folds = np.asarray(labels), np.asarray(probs), np.asarray(folds)
    return _resampled_interval(
        lambda rows: fold_mean_balanced_accuracy(labels[rows], probs[rows], folds[rows]),
        groups, n_boot, level, seed)


def _resampled_interval(statistic, groups: np.ndarray, n_boot: int, level: float, seed: int
                        ) -> tuple[float, float]:
    """Percentile interval of `statistic(rows)` over lesion resamples (NaN rounds dropped)."""
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in lesion_resamples(groups, n_boot, seed):
            value = statistic(rows)
            if np.isfinite(value):
                values.append(value)
    if not values:
        return float("nan"), float("nan")
    return _percentile_interval(np.asarray(values), level)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def signed(self) -> str:
        return f"{self.value:+.3f} (95 % CI {self.low:+.3f} to {self.high:+.3f})"

    def __str__(self) -> str:
        return f"{self.value:.3f} (95 % CI {self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class PairedComparison:
    """Two models' balanced accuracy on the same images, and their difference `a - b`."""

    a: Interval
    b: Interval
    delta: Interval
    per_class: pd.DataFrame  # support, recall_a, recall_b, delta, delta_low, delta_high
    rounds: int
    images: int
    lesions: int


def paired_balanced_accuracy(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray,
                             groups: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                             seed: int = 0) -> PairedComparison:
    """Paired lesion bootstrap of balanced accuracy: every round resamples the same lesions
    for both models, so what they share (hard lesions, easy lesions) cancels in the difference
    and its interval is much narrower than two separate intervals suggest."""
    labels = np.asarray(labels)
    hit_a = predictions(probs_a) == labels
    hit_b = predictions(probs_b) == labels
    resampled_a, resampled_b = [], []
    for rows in lesion_resamples(groups, n_boot, seed):
        resampled_a.append(_class_recalls(labels[rows], hit_a[rows]))
        resampled_b.append(_class_recalls(labels[rows], hit_b[rows]))
    recalls_a, recalls_b = np.asarray(resampled_a), np.asarray(resampled_b)
    # Balanced accuracy is the mean recall over the classes present in that resample.
    score_a, score_b = np.nanmean(recalls_a, axis=1), np.nanmean(recalls_b, axis=1)
    whole_a, whole_b = _class_recalls(labels, hit_a), _class_recalls(labels, hit_b)
    a = Interval(float(np.nanmean(whole_a)), *_percentile_interval(score_a, level))
    b = Interval(float(np.nanmean(whole_b)), *_percentile_interval(score_b, level))
    delta = Interval(a.value - b.value, *_percentile_interval(score_a - score_b, level))
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from every resample: NaN bounds
        low, high = np.nanpercentile(recalls_a - recalls_b, [tail, 100 - tail], axis=0)
    per_class = pd.DataFrame({"support": np.bincount(labels, minlength=NUM_CLASSES),
                              "recall_a": whole_a, "recall_b": whole_b,
                              "delta": whole_a - whole_b, "delta_low": low, "delta_high": high},
                             index=pd.Index(CLASSES, name="class"))
    return PairedComparison(a, b, delta, per_class, n_boot, len(labels),
                            len(np.unique(np.asarray(groups))))


def _class_recalls(labels: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Recall per class (NaN for a class with no images): what balanced accuracy averages."""
    support = np.bincount(labels, minlength=NUM_CLASSES)
    correct = np.bincount(labels, weights=hits, minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / support, np.nan)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (ties count as wrong).

    The same number as sklearn's macro recall over the present classes, computed with two
    bincounts: a lesion bootstrap calls it a thousand times per interval.
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    recalls = _class_recalls(labels, predictions(probs) == labels)
    return float(np.nanmean(recalls))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes with both positives and negatives."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    aucs = [_auc(labels == c, probs[:, c]) for c in np.unique(labels)
            if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half): sklearn's roc_auc_score,
    without its per-call overhead."""
    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


AGE_BANDS = (("<30", 0, 30), ("30-49", 30, 50), ("50-69", 50, 70), (">=70", 70, 200))
SMALL_GROUP = 30  # images; below this a subgroup's numbers are flagged, not hidden


def age_band(age: float) -> str:
    if age is None or not np.isfinite(age):
        return "unknown"
    return next(name for name, low, high in AGE_BANDS if low <= age < high)


def subgroup_metrics(labels: np.ndarray, probs: np.ndarray, attributes: pd.DataFrame
                     ) -> pd.DataFrame:
    """Balanced accuracy, per-class sensitivity and counts for every group of every attribute.

    `attributes` has one column per attribute (sex, age_band, localization), row-aligned
    with `labels`; groups under SMALL_GROUP images are flagged `small`.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    predicted = predictions(probs)
    rows = []
    for attribute in attributes.columns:
        values = attributes[attribute].astype(str).to_numpy()
        for group in sorted(set(values)):
            chosen = values == group
            row = {"attribute": attribute, "group": group, "images": int(chosen.sum()),
                   "small": bool(chosen.sum() < SMALL_GROUP),
                   "balanced_accuracy": compute_metrics(labels[chosen],
                                                        probs[chosen])["balanced_accuracy"]}
            for cls, name in enumerate(CLASSES):
                positive = chosen & (labels == cls)
                row[f"n_{name}"] = int(positive.sum())
                row[f"sensitivity_{name}"] = (float((predicted[positive] == cls).mean())
                                              if positive.any() else np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def confusion(labels: np.ndarray, probs: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Confusion matrix (rows true, columns predicted); `normalize` divides rows by their sum."""
    return skm.confusion_matrix(labels, predictions(probs), labels=_ALL,
                                normalize="true" if normalize else None)


def classification_report(labels: np.ndarray, probs: np.ndarray, as_dict: bool = False
                          ) -> str | dict:
    """sklearn's classification report with the class names."""
    return skm.classification_report(labels, predictions(probs), labels=_ALL,
                                     target_names=list(CLASSES), zero_division=0, digits=3,
                                     output_dict=as_dict)
