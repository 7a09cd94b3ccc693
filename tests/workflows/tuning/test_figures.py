"""Optuna's figures of a study, as the MLflow UI shows them: in-memory studies over the
shipped search space, no training."""

from __future__ import annotations

import logging

import matplotlib
import optuna
import pytest
from matplotlib import pyplot as plt

from skinml.core.config import shipped_or_path
from skinml.workflows.tuning import figures as tuning_figures
from skinml.workflows.tuning.options import OBJECTIVE
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.trials import suggest

from ...conftest import fits_inside


def make_study(trials: int, epochs: int = 3) -> optuna.Study:
    """An in-memory study over the shipped search space (17 parameters); no training."""
    space = load_search_space(shipped_or_path("search_space"))

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, space)
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
    figure = tuning_figures.study_figures(study)["parallel_coordinate.png"]
    names = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert names[0] == OBJECTIVE
    most_important = list(optuna.importance.get_param_importances(study))
    assert set(names[1:]) == set(most_important[:tuning_figures.PARALLEL_PARAMS])
    assert len(sampled(study)) > tuning_figures.PARALLEL_PARAMS + 5


def test_param_importances_show_full_parameter_names(study):
    figure = tuning_figures.study_figures(study)["param_importances.png"]
    figure.canvas.draw()
    labels = figure.axes[0].get_yticklabels()
    assert {label.get_text() for label in labels} == sampled(study)
    for label in labels:
        assert fits_inside(label.get_window_extent(), figure.bbox), label.get_text()


def test_every_tuning_figure_fits_the_ui_preview(study):
    for name, figure in tuning_figures.study_figures(study).items():
        width, height = figure.get_size_inches() * figure.dpi
        assert 800 <= width <= 1000 and height <= 700, name
        figure.canvas.draw()  # runs the layout engine
        drawn = figure.get_tightbbox().transformed(figure.dpi_scale_trans)
        assert fits_inside(drawn, figure.bbox), name  # no label or legend cut off


def test_trial_and_epoch_axes_are_named_and_have_whole_number_ticks():
    figures = tuning_figures.study_figures(make_study(3, epochs=2))
    for name, xlabel in (("optimization_history.png", "trial"),
                         ("intermediate_values.png", "epoch")):
        axes = figures[name].axes[0]
        assert (axes.get_xlabel(), axes.get_ylabel()) == (xlabel, OBJECTIVE)
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_figures_that_cannot_be_drawn_yet_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="skinml.workflows.tuning.figures"):
        figures = tuning_figures.study_figures(make_study(1, epochs=0))
    assert list(figures) == ["optimization_history.png"]
    skipped = {"param_importances.png", "parallel_coordinate.png", "intermediate_values.png"}
    assert {name for name in skipped if name in caplog.text} == skipped


def test_optunas_ggplot_style_does_not_leak_into_later_figures(study):
    with matplotlib.rc_context():
        plt.style.use("default")
        before = dict(matplotlib.rcParams)
        tuning_figures.study_figures(study)
        assert dict(matplotlib.rcParams) == before
