"""Optuna's figures of a study, as the MLflow UI shows them: in-memory studies over the
shipped search space, no training."""

from __future__ import annotations

import logging
import warnings

import matplotlib
import optuna
import pytest
from matplotlib import pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex, to_rgba

from skinml.core.config import shipped_or_path
from skinml.workflows.tuning import figures as tuning_figures
from skinml.workflows.tuning.options import OBJECTIVE
from skinml.workflows.tuning.search_space import load_search_space
from skinml.workflows.tuning.trials import suggest

from ...conftest import fits_inside


def make_study(trials: int, epochs: int = 3, pruned: int = 0) -> optuna.Study:
    """An in-memory study over the shipped search space (17 parameters): `trials` complete,
    then `pruned` stopped after their first epoch; no training."""
    space = load_search_space(shipped_or_path("search_space"))

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, space)
        value = 0.3 + 0.4 * trial.params["augment.scale_min"] + 0.1 * trial.params["augment.hflip"]
        for epoch in range(1, epochs + 1):
            trial.report(value * epoch / epochs, step=epoch)
            if trial.number >= trials:
                raise optuna.TrialPruned()
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="figures",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=trials + pruned)
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


def test_figures_that_cannot_be_drawn_yet_are_skipped_with_one_line_saying_why(caplog):
    with caplog.at_level(logging.INFO, logger="skinml.workflows.tuning.figures"):
        figures = tuning_figures.study_figures(make_study(1, epochs=0))
    assert list(figures) == ["optimization_history.png"]
    skipped = {"param_importances.png", "parallel_coordinate.png", "intermediate_values.png"}
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert {name for name in skipped if name in record.getMessage()} == skipped


ALL_FIGURES = ["optimization_history.png", "param_importances.png", "parallel_coordinate.png",
               "intermediate_values.png"]


@pytest.mark.parametrize(("complete", "drawn"), [
    (1, ["optimization_history.png", "intermediate_values.png"]),
    (2, ALL_FIGURES), (3, ALL_FIGURES), (50, ALL_FIGURES)])
def test_small_and_large_studies_get_the_figures_that_say_something(complete, drawn, caplog):
    study = make_study(complete, pruned=2)
    with (caplog.at_level(logging.INFO, logger="skinml.workflows.tuning.figures"),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        figures = tuning_figures.study_figures(study)
        for figure in figures.values():
            figure.canvas.draw()
    assert list(figures) == drawn
    assert [str(w.message) for w in caught] == []  # Optuna's notices stay inside
    skipped = [name for name in ALL_FIGURES if name not in drawn]
    assert len(caplog.records) == (1 if skipped else 0), caplog.text
    for record in caplog.records:
        assert record.levelno == logging.INFO
        assert all(record.getMessage().count(name) == 1 for name in skipped), record.getMessage()
        assert "1 complete trial" in record.getMessage()
    plt.close("all")


@pytest.mark.parametrize("complete", [2, 3, 50])
def test_parallel_coordinate_draws_one_visible_line_per_complete_trial(complete):
    figure = tuning_figures.study_figures(make_study(complete, pruned=2))["parallel_coordinate.png"]
    axes = figure.axes[0]
    [lines] = [c for c in axes.collections if isinstance(c, LineCollection)]
    assert len(lines.get_segments()) == complete
    assert not [t.get_text() for t in axes.get_xticklabels() if t.get_text().endswith("...")]
    colours = lines.to_rgba(lines.get_array())
    near_white = [tuple(c[:3].round(2)) for c in colours if min(c[:3]) > 0.9]
    assert near_white == []  # the figure's background is white
    low, high = axes.get_ylim()
    margin = (high - low) * 0.02  # a line along the edge is clipped to half its width
    for segment in lines.get_segments():
        assert all(low + margin < y < high - margin for y in segment[:, 1]), segment[:, 1]
    plt.close(figure)


def contrast(colour, background) -> float:
    """WCAG's contrast ratio of two colours (1: the same; 21: black on white)."""
    def luminance(rgb) -> float:
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    low, high = sorted((luminance(colour), luminance(background)))
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("complete", [2, 50])
def test_intermediate_values_give_each_trial_a_colour_that_shows(complete):
    figure = tuning_figures.study_figures(make_study(complete, pruned=2))["intermediate_values.png"]
    axes = figure.axes[0]
    colours = [to_hex(line.get_color()) for line in axes.get_lines()]
    assert len(colours) == complete + 2
    assert len(set(colours[:10])) == len(colours[:10])
    assert max(colours.count(c) for c in colours) <= len(colours) // 10 + 1, colours
    background = axes.get_facecolor()
    faint = [c for c in colours if contrast(to_rgba(c), background) < 1.5]
    assert faint == []  # a trial pruned after its first epoch is one dot in that colour
    plt.close(figure)


@pytest.mark.parametrize("complete", [2, 50])
def test_param_importances_have_one_title(complete):
    figure = tuning_figures.study_figures(make_study(complete))["param_importances.png"]
    axes = figure.axes[0]
    titles = [axes.get_title(loc) for loc in ("left", "center", "right")]
    assert [t for t in titles if t] == [f"parameter importance for {OBJECTIVE}"]
    plt.close(figure)


def test_importances_are_skipped_when_no_parameter_varies(caplog):
    study = optuna.create_study(direction="maximize", study_name="same")
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    for value in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(
            params={"augment.hue": 0.04}, distributions={"augment.hue": distribution},
            value=value, intermediate_values={1: value}))
    with caplog.at_level(logging.INFO, logger="skinml.workflows.tuning.figures"):
        figures = tuning_figures.study_figures(study)
    assert "param_importances.png" not in figures
    [record] = caplog.records
    assert "param_importances.png" in record.getMessage()
    assert "same parameter" in record.getMessage()
    plt.close("all")


def test_optunas_ggplot_style_does_not_leak_into_later_figures(study):
    with matplotlib.rc_context():
        plt.style.use("default")
        before = dict(matplotlib.rcParams)
        tuning_figures.study_figures(study)
        assert dict(matplotlib.rcParams) == before
