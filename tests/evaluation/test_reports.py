"""Figures read in the MLflow UI: plain axis labels, readable at preview size, honest
Grad-CAM colour scales. Real sklearn displays, real (untrained) Grad-CAM overlays."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from skinml.core.labels import CLASSES
from skinml.evaluation import reports
from skinml.evaluation.explain import explain
from skinml.evaluation.metrics import subgroup_metrics

from ..conftest import SAMPLE_IMAGES, fits_inside


def scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels of every class (nv most common) and probabilities that favour the truth."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(len(CLASSES)),
                             rng.choice(len(CLASSES), n - len(CLASSES))])
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), labels] += 1.5
    return labels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def axis_texts(figure) -> list[str]:
    return [t for axes in figure.axes for t in (axes.get_xlabel(), axes.get_ylabel())]


# --- reports: ROC, PR, reliability, subgroups -----------------------------------------


def test_roc_and_pr_axes_have_plain_labels_without_sklearns_positive_label():
    labels, probs = scores()
    roc = reports.roc_figure(labels, probs, "t")
    pr = reports.pr_figure(labels, probs, "t")
    assert axis_texts(roc) == ["false positive rate", "true positive rate (sensitivity)"]
    assert axis_texts(pr) == ["recall (sensitivity)", "precision"]


def test_pr_and_roc_legends_sit_beside_the_axes_not_over_the_curves():
    labels, probs = scores()
    for figure in (reports.roc_figure(labels, probs, "t"), reports.pr_figure(labels, probs, "t")):
        figure.canvas.draw()
        axes = figure.axes[0]
        legend = axes.get_legend().get_window_extent()
        assert legend.x0 >= axes.get_window_extent().x1
        assert fits_inside(legend, figure.bbox)  # and not cut off either


def test_reliability_figure_shows_the_images_in_each_confidence_bin():
    labels, probs = scores()
    sharper = probs ** 2 / (probs ** 2).sum(1, keepdims=True)
    figure = reports.reliability_figure(labels, sharper, probs, 0.5, "t")
    counts = [axes for axes in figure.axes if axes.patches]
    assert len(counts) == 1 and "images" in counts[0].get_ylabel()
    heights = [bar.get_height() for bar in counts[0].patches]
    assert sum(heights) == 2 * len(labels)  # every image once before, once after scaling


def test_subgroup_figure_orders_age_bands_by_age_and_says_which_have_no_images():
    labels, probs = scores(120)
    rng = np.random.default_rng(1)
    attributes = pd.DataFrame({  # nobody aged 30-49
        "sex": rng.choice(["male", "female"], len(labels)),
        "age_band": rng.choice(["<30", "50-69", ">=70", "unknown"], len(labels)),
        "localization": rng.choice(["back", "unknown", "face"], len(labels))})
    figure = reports.subgroup_figure(subgroup_metrics(labels, probs, attributes), "t")
    age = next(a for a in figure.axes if a.get_title(loc="left") == "age band")
    ticks = [t.get_text().split(" (")[0] for t in age.get_yticklabels()]
    assert ticks == ["<30", "30-49", "50-69", ">=70", "unknown"]
    assert "no images" in [t.get_text() for t in age.texts]
    places = next(a for a in figure.axes if a.get_title(loc="left") == "localization")
    assert places.get_yticklabels()[-1].get_text().startswith("unknown")


# --- Grad-CAM figures ---------------------------------------------------------------


def test_gradcam_figures_name_the_feature_map_and_have_a_colour_scale(gradcam_model):
    cells = []
    for path in SAMPLE_IMAGES[:2]:
        with Image.open(path) as image:
            cells.append((explain(gradcam_model, image)[0], path.stem))
    grid = reports.gradcam_grid([cells] + [[] for _ in CLASSES[1:]], "t")
    single = reports.gradcam_figure(*cells[0])
    for figure in (grid, single):
        assert "Grad-CAM from a 3x3 feature map" in figure.get_suptitle()
        assert any("Grad-CAM" in axes.get_ylabel() for axes in figure.axes)  # the colour bar


def test_gradcam_grid_without_feature_map_info_still_draws():
    picture = Image.new("RGB", (40, 30))
    figure = reports.gradcam_grid([[(picture, "x")]] + [[] for _ in CLASSES[1:]], "t")
    assert "Grad-CAM" in figure.get_suptitle()


def test_a_temperature_that_worsened_calibration_is_said_under_the_table():
    scores = {"balanced_accuracy": 0.5, "auc": 0.8, "average_precision": 0.5, "accuracy": 0.6,
              "macro_f1": 0.4, "nll": 1.0, "nll_uncalibrated": 1.1, "temperature": 1.5}
    better = reports.metrics_markdown({**scores, "ece_uncalibrated": 0.14, "ece": 0.11}, "test")
    worse = reports.metrics_markdown({**scores, "ece_uncalibrated": 0.117, "ece": 0.142}, "test")
    assert "worse" not in better
    assert worse.startswith(better.split("\n| expected")[0])  # the same table first
    assert "calibration worse (ECE 0.117 -> 0.142)" in worse.splitlines()[-1]
