"""Classification metrics: numpy arrays in, plain dicts and tables out (sklearn computes them).

Balanced accuracy (mean per-class recall) is the ISIC 2018 Task 3 metric and the one runs
are compared by; AUC and average precision are one-vs-rest per class, macro-averaged over
the classes present in the labels.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from skinml.labels import CLASSES, NUM_CLASSES

_ALL = list(range(NUM_CLASSES))


def predictions(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs).argmax(axis=1)


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Scalar metrics of a split: balanced_accuracy, accuracy, macro_f1, auc, average_precision."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    predicted = predictions(probs)
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent classes: sklearn warns, we report NaN
        table = per_class_metrics(labels, probs)
        return {
            "balanced_accuracy": float(skm.recall_score(labels, predicted, labels=present,
                                                        average="macro", zero_division=0)),
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
    auc, ap = [], []
    for cls in _ALL:
        positive = labels == cls
        if positive.all() or not positive.any():
            auc.append(np.nan)
            ap.append(np.nan)
            continue
        auc.append(skm.roc_auc_score(positive, probs[:, cls]))
        ap.append(skm.average_precision_score(positive, probs[:, cls]))
    return pd.DataFrame({"precision": precision, "recall": recall, "f1": f1,
                         "support": support, "auc": auc, "average_precision": ap},
                        index=pd.Index(CLASSES, name="class"))


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
