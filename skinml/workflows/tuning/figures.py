"""Optuna's figures of a study, labelled and sized for the MLflow UI's preview (900 x 600 px).

Each is drawn by Optuna's matplotlib backend and then given plain titles and axis names; a
figure with nothing to show yet (too few trials) is skipped with a warning, not drawn empty.
"""

from __future__ import annotations

import logging
import warnings

import optuna
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState
from optuna.visualization import matplotlib as plots

from skinml.workflows.tuning.options import OBJECTIVE

log = logging.getLogger(__name__)

PARALLEL_PARAMS = 5  # more axes than this are unreadable at the MLflow UI's preview size


def study_figures(study: optuna.Study, objective: str = OBJECTIVE, step: str = "epoch"
                  ) -> dict[str, Figure]:
    """Optuna's matplotlib figures, labelled and sized (900 x 600 px) for the MLflow UI.

    One that cannot be drawn yet (too few trials) is skipped with a warning.
    """
    makers = {
        "optimization_history.png": lambda: _history_axes(
            plots.plot_optimization_history(study, target_name=objective), objective),
        "param_importances.png": lambda: _importance_axes(
            plots.plot_param_importances(study, target_name=objective), objective),
        "parallel_coordinate.png": lambda: _parallel_axes(plots, study, objective),
        "intermediate_values.png": lambda: _intermediate_axes(
            plots.plot_intermediate_values(study), objective, step),
    }
    missing = not_drawable(study)
    figures = {}
    for name, make in makers.items():
        if name in missing:
            log.warning("no %s yet: %s", name, missing[name])
            continue
        try:
            # rc_context undoes the ggplot style Optuna sets for every later figure
            with warnings.catch_warnings(), rc_context():
                warnings.simplefilter("ignore")  # "experimental" notices and few-trial hints
                axes = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("no %s: %s", name, exc)
            continue
        figure = axes.figure
        figure.set_size_inches(9, 6)
        figure.suptitle(f"study {study.study_name}")
        figure.set_layout_engine("tight")  # room for full parameter names and legends
        figures[name] = figure
    return figures


def not_drawable(study: optuna.Study) -> dict[str, str]:
    """Figures with nothing to show yet, and why (Optuna would draw them empty)."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    missing = {}
    if complete == 0:
        missing["optimization_history.png"] = "no complete trial"
    if complete < 2:
        for name in ("param_importances.png", "parallel_coordinate.png"):
            missing[name] = f"{complete} complete trial(s), a comparison needs 2"
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        missing["intermediate_values.png"] = "no trial has reported an epoch"
    return missing


def important_params(study: optuna.Study) -> tuple[list[str], bool]:
    """The PARALLEL_PARAMS most important parameters, and whether Optuna could rank them
    (if not: the first ones sampled)."""
    try:
        return list(optuna.importance.get_param_importances(study))[:PARALLEL_PARAMS], True
    except (ValueError, RuntimeError, ZeroDivisionError):
        return _sampled_params(study)[:PARALLEL_PARAMS], False


def _sampled_params(study: optuna.Study) -> list[str]:
    return list(dict.fromkeys(name for t in study.get_trials(deepcopy=False)
                              for name in t.params))


def _history_axes(axes, objective: str):
    axes.set_title("each complete trial, and the best so far")
    _label_integer_x(axes, "trial", objective)
    handles, labels = axes.get_legend_handles_labels()
    names = {objective: "complete trial", "Best Value": "best so far"}
    axes.legend(handles, [names.get(label, label) for label in labels], loc="best")
    return axes


def _importance_axes(axes, objective: str):
    axes.set_title(f"parameter importance for {objective}")
    axes.set_xlabel("importance (Optuna PED-ANOVA; sums to 1)")
    axes.set_ylabel("")
    if axes.get_legend() is not None:  # one objective: the legend says nothing
        axes.get_legend().remove()
    return axes


def _parallel_axes(plots, study: optuna.Study, objective: str):
    names, ranked = important_params(study)
    axes = plots.plot_parallel_coordinate(study, params=names, target_name=objective)
    which = "most important" if ranked else "first sampled"
    axes.set_title(f"the {len(names)} {which} of {len(_sampled_params(study))} parameters",
                   y=1.03)
    axes.tick_params(axis="x", labelrotation=-20)
    for label in axes.get_xticklabels():
        label.set_horizontalalignment("left")
    return axes


def _intermediate_axes(axes, objective: str, step: str):
    what = "running mean " if step == "fold" else ""
    axes.set_title(f"{what}after each {step}, one line per trial (pruned trials stop early)")
    _label_integer_x(axes, step, objective)
    if axes.get_legend() is not None and len(axes.get_lines()) > 12:
        axes.get_legend().remove()  # a legend this long runs off the figure
    return axes


def _label_integer_x(axes, xlabel: str, ylabel: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
