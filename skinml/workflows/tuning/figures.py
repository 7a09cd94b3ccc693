"""Optuna's figures of a study, labelled and sized for the MLflow UI's preview (900 x 600 px).

Each is drawn by Optuna's matplotlib backend and then given plain titles and axis names; a
figure with nothing to show yet (too few trials) is skipped, not drawn empty, and one log
line says which and why.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import optuna
from matplotlib import colormaps, rc_context
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState
from optuna.visualization import matplotlib as plots

from skinml.workflows.tuning.options import OBJECTIVE

log = logging.getLogger(__name__)

PARALLEL_PARAMS = 5  # more axes than this are unreadable at the MLflow UI's preview size
# Optuna colours parallel-coordinate lines from white (worst trial) to dark blue: the
# lightest 35% of the colour map would vanish on the white figure.
LIGHTEST_SHOWN = 0.35
TRIAL_COLOURS = colormaps["tab10"]  # intermediate values: strong colours, repeated every 10
EDGE_MARGIN = 0.06  # of each parallel axis's height, kept free above and below the lines


def study_figures(study: optuna.Study, objective: str = OBJECTIVE, step: str = "epoch"
                  ) -> dict[str, Figure]:
    """Optuna's matplotlib figures, labelled and sized (900 x 600 px) for the MLflow UI.

    One that cannot say anything yet (too few trials) is skipped; one INFO line says why.
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
    if missing:
        log.info("study figures not drawn yet: %s", _reasons(missing))
    figures = {}
    for name, make in makers.items():
        if name in missing:
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
    """Figures with nothing to show yet, and why (Optuna would draw them empty or, for
    importances of parameters that never changed, make numbers up)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    missing = {}
    if not complete:
        missing["optimization_history.png"] = "no complete trial"
    if len(complete) < 2:
        for name in ("param_importances.png", "parallel_coordinate.png"):
            missing[name] = f"{len(complete)} complete trial(s), a comparison needs 2"
    elif not _sampled_params(study):
        for name in ("param_importances.png", "parallel_coordinate.png"):
            missing[name] = "no trial has sampled a parameter"
    elif all(t.params == complete[0].params for t in complete):
        missing["param_importances.png"] = "the complete trials all have the same parameters"
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


def _reasons(missing: dict[str, str]) -> str:
    """'a.png, b.png (why); c.png (why)': the figures grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in missing.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


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
    axes.set_title("", loc="left")  # Optuna's own title, which ours would overprint
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
    _keep_lines_visible(axes)
    # Optuna orders the axes by name and cuts names at 20 characters ("augment.cutmix_al...")
    axes.set_xticks(axes.get_xticks(), [objective, *sorted(names)])
    axes.tick_params(axis="x", labelrotation=-20)
    for label in axes.get_xticklabels():
        label.set_horizontalalignment("left")
    return axes


def _keep_lines_visible(axes) -> None:
    """No line white on the white figure, none along an edge (clipped to half its width)."""
    for lines in axes.collections:
        lines.set_cmap(_without_light_end(lines.get_cmap()))
    for each in axes.get_shared_x_axes().get_siblings(axes):  # the objective's, each parameter's
        _pad_vertically(each, EDGE_MARGIN)


def _without_light_end(cmap) -> ListedColormap:
    """`cmap` less its lightest LIGHTEST_SHOWN, so that every line shows on white."""
    light_first = sum(cmap(0.0)[:3]) > sum(cmap(1.0)[:3])
    span = (LIGHTEST_SHOWN, 1.0) if light_first else (0.0, 1.0 - LIGHTEST_SHOWN)
    return ListedColormap(cmap(np.linspace(*span, 256)), name=f"{cmap.name}_shown")


def _pad_vertically(axes, fraction: float) -> None:
    """Widen the y range by `fraction` of its height at each end, on the axis's own scale
    (linear or log), so that lines at the lowest or highest value stay inside."""
    scale = axes.yaxis.get_transform()
    low, high = scale.transform(axes.get_ylim())
    pad = (high - low) * fraction
    axes.set_ylim(*scale.inverted().transform([low - pad, high + pad]))


def _intermediate_axes(axes, objective: str, step: str):
    what = "running mean " if step == "fold" else ""
    axes.set_title(f"{what}after each {step}, one line per trial (pruned trials stop early)")
    _label_integer_x(axes, step, objective)
    lines = axes.get_lines()
    for number, line in enumerate(lines):  # Optuna's tab20 has pale shades, 20 colours at most
        line.set_color(TRIAL_COLOURS(number % TRIAL_COLOURS.N))
        line.set_markersize(8)  # a trial pruned after its first step is this one dot
    legend = axes.get_legend()
    if legend is not None and len(lines) > 12:
        legend.remove()  # a legend this long runs off the figure
    elif legend is not None:
        for handle, line in zip(legend.legend_handles, lines, strict=True):
            handle.set_color(line.get_color())
    return axes


def _label_integer_x(axes, xlabel: str, ylabel: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
