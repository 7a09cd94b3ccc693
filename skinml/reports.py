"""Figures for the MLflow UI: class names on axes, run and split in titles."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are only saved

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from skinml.labels import CLASSES, DIAGNOSES  # noqa: E402
from skinml.metrics import confusion  # noqa: E402


def confusion_matrix_figure(labels: np.ndarray, probs: np.ndarray, title: str,
                            normalize: bool = False) -> Figure:
    matrix = confusion(labels, probs, normalize=normalize)
    figure, axes = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    display = skm.ConfusionMatrixDisplay(matrix, display_labels=list(CLASSES))
    display.plot(ax=axes, cmap="Blues", colorbar=True, values_format=".2f" if normalize else "d")
    kind = "row-normalised (recall on the diagonal)" if normalize else "counts"
    axes.set_title(f"{title}\n{kind}")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    return figure


def roc_figure(labels: np.ndarray, probs: np.ndarray, title: str) -> Figure:
    return _curves(labels, probs, title, roc=True)


def pr_figure(labels: np.ndarray, probs: np.ndarray, title: str) -> Figure:
    return _curves(labels, probs, title, roc=False)


def _curves(labels: np.ndarray, probs: np.ndarray, title: str, roc: bool) -> Figure:
    figure, axes = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    for cls, name in enumerate(CLASSES):
        positive = labels == cls
        if positive.all() or not positive.any():
            continue
        if roc:
            skm.RocCurveDisplay.from_predictions(positive, probs[:, cls], ax=axes,
                                                 name=f"{name} ({DIAGNOSES[name]})")
        else:
            skm.PrecisionRecallDisplay.from_predictions(positive, probs[:, cls], ax=axes,
                                                        name=f"{name} ({DIAGNOSES[name]})")
    if roc:
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set_title(f"{title}\n{'ROC, one-vs-rest' if roc else 'precision-recall, one-vs-rest'}")
    axes.legend(loc="lower right" if roc else "lower left", fontsize="small")
    return figure
