"""Figures read in the MLflow UI: plain axis labels, readable at preview size, honest Grad-CAM.

Real components throughout: sklearn's displays, in-memory Optuna studies over the shipped
search space, an untrained resnext_small at 96 px for Grad-CAM.
"""

from __future__ import annotations

import logging

import matplotlib
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from matplotlib import pyplot as plt
from mlflow.pyfunc import PythonModelContext
from PIL import Image

from skinml import packaging, reports, tune
from skinml.config import ModelConfig, shipped_or_path
from skinml.data.metadata import default_data_dir
from skinml.data.preprocess import Preprocess
from skinml.explain import FEATURE_MAP, cam_on_image, explain
from skinml.labels import CLASSES
from skinml.metrics import subgroup_metrics
from skinml.model import build_model
from skinml.search_space import load_search_space

IMAGES = sorted(default_data_dir().glob("*.jpg"))[:2]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


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


def inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - 0.5 and inner.x1 <= outer.x1 + 0.5
            and inner.y0 >= outer.y0 - 0.5 and inner.y1 <= outer.y1 + 0.5)


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
        assert inside(legend, figure.bbox)  # and not cut off either


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


# --- tune: Optuna's figures ------------------------------------------------------------


def make_study(trials: int, epochs: int = 3) -> optuna.Study:
    """An in-memory study over the shipped search space (17 parameters); no training."""
    space = load_search_space(shipped_or_path("search_space"))

    def objective(trial: optuna.Trial) -> float:
        tune.suggest(trial, space)
        value = 0.3 + 0.4 * trial.params["augment.scale_min"] + 0.1 * trial.params["augment.hflip"]
        for epoch in range(1, epochs + 1):
            trial.report(value * epoch / epochs, step=epoch)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="figures",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=trials)
    return study


def sampled(study: optuna.Study) -> set[str]:
    return {name for trial in study.trials for name in trial.params}


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return make_study(12)


@pytest.mark.filterwarnings("ignore:Some regimes")  # Optuna: few trials per category
def test_parallel_coordinate_shows_only_the_most_important_parameters(study):
    figure = tune._figures(study)["parallel_coordinate.png"]
    names = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert names[0] == tune.OBJECTIVE
    most_important = list(optuna.importance.get_param_importances(study))
    assert set(names[1:]) == set(most_important[:tune.PARALLEL_PARAMS])
    assert len(sampled(study)) > tune.PARALLEL_PARAMS + 5


def test_param_importances_show_full_parameter_names(study):
    figure = tune._figures(study)["param_importances.png"]
    figure.canvas.draw()
    labels = figure.axes[0].get_yticklabels()
    assert {label.get_text() for label in labels} == sampled(study)
    for label in labels:
        assert inside(label.get_window_extent(), figure.bbox), label.get_text()


def test_every_tuning_figure_fits_the_ui_preview(study):
    for name, figure in tune._figures(study).items():
        width, height = figure.get_size_inches() * figure.dpi
        assert 800 <= width <= 1000 and height <= 700, name
        figure.canvas.draw()  # runs the layout engine
        drawn = figure.get_tightbbox().transformed(figure.dpi_scale_trans)
        assert inside(drawn, figure.bbox), name  # no label or legend cut off


def test_trial_and_epoch_axes_are_named_and_have_whole_number_ticks():
    figures = tune._figures(make_study(3, epochs=2))
    for name, xlabel in (("optimization_history.png", "trial"),
                         ("intermediate_values.png", "epoch")):
        axes = figures[name].axes[0]
        assert (axes.get_xlabel(), axes.get_ylabel()) == (xlabel, tune.OBJECTIVE)
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_figures_that_cannot_be_drawn_yet_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="skinml.tune"):
        figures = tune._figures(make_study(1, epochs=0))
    assert list(figures) == ["optimization_history.png"]
    skipped = {"param_importances.png", "parallel_coordinate.png", "intermediate_values.png"}
    assert {name for name in skipped if name in caplog.text} == skipped


def test_optunas_ggplot_style_does_not_leak_into_later_figures(study):
    with matplotlib.rc_context():
        plt.style.use("default")
        before = dict(matplotlib.rcParams)
        tune._figures(study)
        assert dict(matplotlib.rcParams) == before


# --- Grad-CAM --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained resnext_small at 96 px, loaded as serving loads it (3x3 feature map)."""
    torch.manual_seed(0)
    config = ModelConfig(arch="resnext_small", image_size=96)
    path = tmp_path_factory.mktemp("gradcam") / "weights.pt"
    packaging.save_weights(path, build_model(config).state_dict(),
                           packaging.model_meta(config, (120, 160)))
    served = packaging.SkinLesionModel()
    served.load_context(PythonModelContext({"weights": str(path)}, {}))
    return served


def test_cam_is_upsampled_smoothly_with_no_hard_edge_at_the_crop():
    preprocess = Preprocess(96, 0.875, (120, 160))
    image = Image.new("RGB", (200, 150))
    blocks = cam_on_image(np.eye(3, dtype=np.float32), image, preprocess)
    assert blocks.shape == (150, 200)
    assert len(np.unique(blocks)) > 1000  # nearest-neighbour blocks would have 3 values
    flat = cam_on_image(np.ones((3, 3), dtype=np.float32), image, preprocess)
    steps = max(np.abs(np.diff(flat, axis=0)).max(), np.abs(np.diff(flat, axis=1)).max())
    assert steps < 0.1  # fades out past the crop instead of stopping at a square's edge
    assert flat.max() == pytest.approx(1, abs=0.02) and flat.min() == 0
    # A uniform CAM stays uniform over the whole crop: the map's edges are not pulled towards
    # zero, which would make every CAM (a 1x1 map above all) look like a centred blob.
    single = cam_on_image(np.ones((1, 1), dtype=np.float32), image, preprocess)
    assert (single[50:100, 70:130] == 1).all() and (single[75] >= 0.99).sum() > 100


def test_explain_overlay_keeps_the_image_size_and_names_its_feature_map(model):
    with Image.open(IMAGES[0]) as image:
        picture, index, probability = explain(model, image)
        assert picture.size == image.size
    assert picture.info[FEATURE_MAP] == (3, 3)
    assert 0 <= index < len(CLASSES) and 0 < probability <= 1


def test_gradcam_figures_name_the_feature_map_and_have_a_colour_scale(model):
    cells = []
    for path in IMAGES:
        with Image.open(path) as image:
            cells.append((explain(model, image)[0], path.stem))
    grid = reports.gradcam_grid([cells] + [[] for _ in CLASSES[1:]], "t")
    single = reports.gradcam_figure(*cells[0])
    for figure in (grid, single):
        assert "Grad-CAM from a 3x3 feature map" in figure.get_suptitle()
        assert any("Grad-CAM" in axes.get_ylabel() for axes in figure.axes)  # the colour bar


def test_gradcam_grid_without_feature_map_info_still_draws():
    picture = Image.new("RGB", (40, 30))
    figure = reports.gradcam_grid([[(picture, "x")]] + [[] for _ in CLASSES[1:]], "t")
    assert "Grad-CAM" in figure.get_suptitle()
