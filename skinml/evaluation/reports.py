"""Figures for the MLflow UI: class names on axes, run and split in titles."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # no display: figures are only saved

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from skinml.core.labels import CLASSES, DIAGNOSES  # noqa: E402
from skinml.evaluation.explain import CAM_COLORMAP, FEATURE_MAP  # noqa: E402
from skinml.evaluation.metrics import (  # noqa: E402
    AGE_BANDS,
    classification_report,
    confusion,
    expected_calibration_error,
    reliability,
)


def split_figures(scored, title: str) -> dict[str, Figure]:
    """Every figure logged for a scored split (a scoring.ScoredSplit), by artifact name."""
    labels, probs = scored.labels, scored.probs
    figures = {
        "confusion_matrix.png": confusion_matrix_figure(labels, probs, title),
        "confusion_matrix_normalized.png": confusion_matrix_figure(labels, probs, title,
                                                                   normalize=True),
        "roc_curves.png": roc_figure(labels, probs, title),
        "pr_curves.png": pr_figure(labels, probs, title),
        "reliability_diagram.png": reliability_figure(labels, scored.uncalibrated, probs,
                                                      scored.temperature, title),
    }
    if scored.subgroups is not None:
        figures["subgroups.png"] = subgroup_figure(scored.subgroups, title)
    return figures


def split_tables(scored) -> dict[str, str]:
    """Every text artifact logged for a scored split, by artifact name."""
    labels, probs = scored.labels, scored.probs
    tables = {"classification_report.txt": classification_report(labels, probs),
              "classification_report.json": json.dumps(
                  classification_report(labels, probs, as_dict=True), indent=2),
              "per_class_metrics.csv": scored.per_class.to_csv()}
    if scored.subgroups is not None:
        tables["subgroups.csv"] = scored.subgroups.to_csv(index=False)
    return tables


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
    figure, axes = plt.subplots(figsize=(10, 6), layout="constrained")
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
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate (sensitivity)")
    else:
        axes.set_xlabel("recall (sensitivity)")
        axes.set_ylabel("precision")
    axes.set_title(f"{title}\n{'ROC, one-vs-rest' if roc else 'precision-recall, one-vs-rest'}")
    # beside the axes: inside, it hides the curves of the rare classes
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    return figure


def reliability_figure(labels: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray,
                       temperature: float, title: str) -> Figure:
    """Reliability diagram before and after temperature scaling, images per bin below it."""
    figure, (axes, counts) = plt.subplots(2, 1, figsize=(7, 8), layout="constrained",
                                          sharex=True, height_ratios=[3, 1])
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    after = (f"after (T = {temperature:.2f})" if np.isfinite(temperature)
             else "after (each fold's own T)")
    runs = (("before", uncalibrated, 0.25), (after, calibrated, 0.75))
    for name, probs, position in runs:  # position: where in its bin a count's bar stands
        table = reliability(labels, probs)
        ece = expected_calibration_error(labels, probs)
        line, = axes.plot(table["confidence"][table["count"] > 0],
                          table["accuracy"][table["count"] > 0], marker="o",
                          label=f"{name}: ECE {ece:.3f}")
        width = table["high"] - table["low"]
        counts.bar(table["low"] + width * position, table["count"], width=width * 0.45,
                   color=line.get_color(), label=name)
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(f"{title}\nreliability diagram")
    axes.legend(loc="upper left")
    counts.set_xlabel("confidence (top-label probability)")
    counts.set_ylabel("images per bin")
    return figure


def fold_figure(fold_scores: np.ndarray, oof: dict[str, float], title: str) -> Figure:
    """Each fold's validation balanced accuracy, their mean, and the OOF score with its CI."""
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    folds = np.arange(1, len(fold_scores) + 1)
    axes.bar(folds, fold_scores, color="tab:blue", alpha=0.7, label="fold validation")
    axes.axhline(fold_scores.mean(), color="tab:blue", linestyle="--",
                 label=f"mean of folds {fold_scores.mean():.3f}")
    low, high = oof.get("balanced_accuracy_ci_low"), oof.get("balanced_accuracy_ci_high")
    axes.axhline(oof["balanced_accuracy"], color="tab:red",
                 label=f"out-of-fold {oof['balanced_accuracy']:.3f}")
    if low is not None and high is not None:
        axes.axhspan(low, high, color="tab:red", alpha=0.12,
                     label=f"out-of-fold 95 % CI {low:.3f}-{high:.3f}")
    axes.set_xticks(folds)
    axes.set_xlabel("fold")
    axes.set_ylabel("balanced accuracy")
    axes.set_ylim(0, 1)
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(f"{title}\nvalidation balanced accuracy per fold")
    return figure


def interval_figure(names: list[str], values: list[float], lows: list[float],
                    highs: list[float], title: str, xlabel: str) -> Figure:
    """Values with their 95 % CIs, best at the top: overlapping bars mean the ranking may be
    noise."""
    order = np.argsort(values)
    figure, axes = plt.subplots(figsize=(8, max(3.0, 0.35 * len(values) + 1.5)),
                                layout="constrained")
    y = np.arange(len(values))
    value = np.asarray(values)[order]
    errors = [value - np.asarray(lows)[order], np.asarray(highs)[order] - value]
    axes.errorbar(value, y, xerr=np.clip(errors, 0, None), fmt="o", capsize=3)
    axes.set_yticks(y, [names[i] for i in order])
    axes.set_xlabel(f"{xlabel} (95 % CI, lesion bootstrap)")
    axes.set_xlim(0, 1)
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(title)
    return figure


def subgroup_figure(table, title: str) -> Figure:
    """Balanced accuracy per subgroup; groups under 30 images are hatched and marked, age
    bands in age order (all of them: a band without images says so)."""
    attributes = list(dict.fromkeys(table["attribute"]))
    groups = {a: _ordered_groups(table[table["attribute"] == a], a) for a in attributes}
    figure, all_axes = plt.subplots(len(attributes), 1, layout="constrained",
                                    figsize=(8, 1.2 + 0.35 * sum(map(len, groups.values()))),
                                    height_ratios=[max(1, len(groups[a])) for a in attributes],
                                    squeeze=False)
    for axes, attribute in zip(all_axes[:, 0], attributes, strict=True):
        rows = groups[attribute]
        values = rows["balanced_accuracy"].to_numpy(dtype=float)
        bars = axes.barh([f"{g} (n={n}){' *' if s else ''}" for g, n, s in
                          zip(rows["group"], rows["images"], rows["small"], strict=True)],
                         np.nan_to_num(values), color="tab:blue")
        for bar, small, images, value in zip(bars, rows["small"], rows["images"], values,
                                             strict=True):
            if small:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            text = ("no images" if images == 0 else "undefined" if np.isnan(value)
                    else f"{value:.2f}")
            axes.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, text,
                      va="center", fontsize="small")
        axes.set_xlim(0, 1.08)
        axes.set_title(attribute.replace("_", " "), loc="left", fontsize="medium")
        axes.invert_yaxis()
    all_axes[-1, 0].set_xlabel("balanced accuracy (* = fewer than 30 images: read with care)")
    figure.suptitle(f"{title}: subgroups")
    return figure


def _ordered_groups(rows, attribute: str):
    """Age bands youngest first, bands without images as rows of n=0; 'unknown' last."""
    present = sorted(rows["group"], key=lambda g: (g == "unknown", g))
    if attribute != "age_band":
        return rows.set_index("group").loc[present].reset_index()
    order = [name for name, _, _ in AGE_BANDS] + ["unknown"]
    rows = rows.set_index("group").reindex(order + [g for g in present if g not in order])
    empty = rows["images"].isna()
    rows.loc[empty, "images"], rows.loc[empty, "small"] = 0, True
    return rows.reset_index().astype({"images": int, "small": bool})


def metrics_markdown(scores: dict[str, float], split: str) -> str:
    """The headline numbers with their 95 % bootstrap intervals, as a Markdown table."""
    def ci(name: str) -> str:
        low, high = scores.get(f"{name}_ci_low"), scores.get(f"{name}_ci_high")
        return f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""

    rows = [("balanced accuracy (ISIC 2018 metric)",
             f"{scores['balanced_accuracy']:.3f}{ci('balanced_accuracy')}"),
            ("macro ROC AUC", f"{scores['auc']:.3f}{ci('auc')}"),
            ("macro average precision", f"{scores['average_precision']:.3f}"),
            ("accuracy", f"{scores['accuracy']:.3f}"),
            ("macro F1", f"{scores['macro_f1']:.3f}")]
    if "ece" in scores:
        rows += [("expected calibration error, before / after temperature scaling",
                  f"{scores['ece_uncalibrated']:.3f} / {scores['ece']:.3f}"),
                 ("negative log-likelihood, before / after",
                  f"{scores['nll_uncalibrated']:.3f} / {scores['nll']:.3f}"),
                 ("temperature", f"{scores['temperature']:.3f}"
                  if np.isfinite(scores.get("temperature", np.nan)) else "each fold's own")]
    lines = [f"| {split} split | value (95 % CI, lesion bootstrap) |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if scores.get("ece", 0.0) > scores.get("ece_uncalibrated", np.inf):
        lines += ["", f"Temperature scaling made this split's calibration worse (ECE "
                      f"{scores['ece_uncalibrated']:.3f} -> {scores['ece']:.3f}): the "
                      "temperature was fitted on the run's validation split, and a small "
                      "validation split fits a noisy one (`calibrated=false` serves the "
                      "probabilities before scaling)."]
    return "\n".join(lines)


def table_markdown(frame, float_format: str = "{:.3f}") -> str:
    """A DataFrame as a Markdown table (no optional tabulate dependency)."""
    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = [float_format.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gradcam_grid(rows, title: str) -> Figure:
    """rows[i] = [(PIL image, caption), ...]: one row per class of Grad-CAM overlays
    (explain.explain's), with their colour scale."""
    columns = max((len(r) for r in rows), default=1) or 1
    figure, axes = plt.subplots(len(rows), columns, figsize=(3 * columns + 1, 2.6 * len(rows)),
                                layout="constrained", squeeze=False)
    for row_axes, cells, name in zip(axes, rows, CLASSES, strict=True):
        for ax in row_axes:
            ax.axis("off")
        for ax, (picture, caption) in zip(row_axes, cells, strict=False):
            ax.imshow(picture)
            ax.set_title(caption, fontsize="small")
        if not cells:
            row_axes[0].text(0.5, 0.5, f"no {name} images", ha="center", va="center")
    _cam_colorbar(figure, axes)
    figure.suptitle(f"{title}\n{_cam_title([p for cells in rows for p, _ in cells])}")
    return figure


def gradcam_figure(picture, caption: str) -> Figure:
    """One Grad-CAM overlay (explain.explain's) with its colour scale and what it came from."""
    figure, axes = plt.subplots(figsize=(8, 6.5), layout="constrained")
    axes.imshow(picture)
    axes.axis("off")
    _cam_colorbar(figure, axes)
    figure.suptitle(f"{caption}\n{_cam_title([picture])}")
    return figure


def _cam_colorbar(figure: Figure, axes) -> None:
    scale = ScalarMappable(Normalize(0, 1), cmap=CAM_COLORMAP)
    bar = figure.colorbar(scale, ax=axes, shrink=0.5)
    bar.set_label("Grad-CAM (1 = the image's own maximum)")


def _cam_title(pictures) -> str:
    """Says how coarse the maps are: a 3x3 map marks a region, not a detail."""
    sizes = sorted({tuple(p.info[FEATURE_MAP]) for p in pictures if FEATURE_MAP in p.info})
    if not sizes:
        return "Grad-CAM: where the model looked"
    maps = " or ".join(f"{h}x{w}" for h, w in sizes)
    return (f"Grad-CAM from a {maps} feature map, smoothly upsampled:\n"
            "where the model looked, at that resolution only")


def comparison_figure(comparison, name_a: str, name_b: str, title: str) -> Figure:
    """Per-class recall of two models side by side, and the paired differences with their
    95 % intervals (`comparison` is a metrics.PairedComparison)."""
    table = comparison.per_class
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), layout="constrained",
                                         width_ratios=[3, 2])
    rows = [*CLASSES, "balanced\naccuracy"]
    x = np.arange(len(rows))
    for offset, column, model, name, color in (
            (-0.2, "recall_a", comparison.a, name_a, "tab:blue"),
            (0.2, "recall_b", comparison.b, name_b, "tab:orange")):
        left.bar(x + offset, [*table[column].fillna(0), model.value], width=0.4, color=color,
                 label=name)
        left.errorbar(x[-1] + offset, model.value, fmt="none", capsize=4, color="black",
                      yerr=[[model.value - model.low], [model.high - model.value]])
    left.set_xticks(x, [f"{r}\n(n={n})" for r, n in zip(CLASSES, table["support"],
                                                        strict=True)] + [rows[-1]])
    left.set_ylim(0, 1.05)
    left.set_ylabel("recall (balanced accuracy: mean over classes)")
    left.set_title("per-class recall; bars on balanced accuracy: 95 % CI")
    left.legend(loc="upper left", fontsize="small")
    delta = comparison.delta
    values = [*table["delta"], delta.value]
    lows = [*table["delta_low"], delta.low]
    highs = [*table["delta_high"], delta.high]
    y = np.arange(len(rows))[::-1]
    for yi, value, low, high in zip(y, values, lows, highs, strict=True):
        if np.isfinite(value):
            right.errorbar(value, yi, xerr=[[value - low], [high - value]], fmt="o", capsize=4,
                           color="black" if yi == 0 else "tab:grey")
    right.axvline(0, linestyle=":", color="grey")
    right.set_yticks(y, [r.replace("\n", " ") for r in rows])
    right.set_xlabel("difference in recall (paired lesion bootstrap)")
    right.set_title(f"Δ = {name_a} - {name_b} with 95 % CI\nbalanced accuracy {delta.value:+.3f} "
                    f"({delta.low:+.3f} to {delta.high:+.3f})")
    figure.suptitle(f"{title}\n{comparison.images} images, {comparison.lesions} lesions, "
                    f"{comparison.rounds} paired bootstrap rounds")
    return figure
