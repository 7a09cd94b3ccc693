"""`skinml evaluate`: a logged or registered model on a labelled set, logged as its own run.

The model is called exactly as served (pyfunc on base64 images). Sets: the training run's
own test (or val) split from its split.csv, every image of a labelled HAM10000 folder, or
ISIC 2018 Task 3 images with the official one-hot ground-truth CSV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinml.core.errors import SkinmlError
from skinml.core.labels import CLASSES, PROBABILITY_COLUMNS
from skinml.evaluation import reports
from skinml.evaluation.explain import explain
from skinml.evaluation.scoring import ScoredSplit, score_split, subgroup_attributes
from skinml.tracking import reader
from skinml.tracking.logged_model import load_model, predict_paths
from skinml.tracking.writer import evaluation_run
from skinml.workflows import image_sets

log = logging.getLogger(__name__)

SETS = ("test", "val", "all", "isic")
ISIC_NEEDS = "--split isic needs --truth GROUND_TRUTH.csv and --data-dir IMAGES"


@dataclass(frozen=True)
class EvaluateOptions:
    model_uri: str
    data_dir: str | None = None
    split: str = "test"
    truth_csv: Path | None = None
    tta: bool = False
    bootstrap: int = 1000
    experiment: str = "skin-lesion"
    gradcam_per_class: int = 2


@dataclass(frozen=True)
class EvaluateResult:
    run_id: str
    scored: ScoredSplit
    report: str


def evaluate_model(options: EvaluateOptions) -> EvaluateResult:
    if options.split not in SETS:
        raise SkinmlError(f"--split must be one of {', '.join(SETS)}, got {options.split!r}")
    if options.split == "isic" and (options.truth_csv is None or options.data_dir is None):
        raise SkinmlError(ISIC_NEEDS)
    model = load_model(options.model_uri)
    served = model.unwrap_python_model()
    in_run = options.split in ("test", "val")
    source = reader.source_run_id(options.model_uri) if in_run else None
    images = labelled_images(options, source)
    log.info("evaluating %s on %d images (%s)", options.model_uri, len(images), options.split)
    if options.split in ("all", "isic"):
        _warn_if_trained_on(images, options.model_uri)
    paths = images["path"].tolist()
    uncalibrated = predict_paths(model, paths, options.tta, calibrated=False, clinical=images)
    # Without TTA the served softmax(z / T) is exactly the temperature applied to softmax(z);
    # with TTA it is a mean of tempered views, and a fold ensemble a mean over folds with
    # their own T, so only then is a second pass needed.
    one_temperature = np.isfinite(served.temperature)
    probs = (predict_paths(model, paths, tta=options.tta, clinical=images)
             if options.tta or not one_temperature else None)
    attributes = subgroup_attributes(images) if "sex" in images else None
    scored = score_split(options.split, images["label"].to_numpy(), uncalibrated,
                         served.temperature, images["lesion_id"].to_numpy(), attributes,
                         n_boot=options.bootstrap, served=probs)
    with evaluation_run(options.experiment, options.model_uri, options.split,
                        _logged_params(options), source) as run:
        run.log_scored_split(scored)
        run.log_figures({"gradcam_grid.png": _gradcam_grid(served, images, scored,
                                                           options.gradcam_per_class,
                                                           run.title)})
        report = _report(options, scored, images, run.title)
        run.log_text(report, "evaluation_report.md")
        run.log_text(_predictions_table(images, scored).to_csv(index=False),
                     "predictions.csv")
    return EvaluateResult(run.run_id, scored, report)


def _logged_params(options: EvaluateOptions) -> dict[str, object]:
    """The evaluation's options as the run's `eval.*` params."""
    return {"split": options.split, "tta": options.tta, "bootstrap": options.bootstrap,
            "data_dir": options.data_dir, "truth_csv": str(options.truth_csv or "")}


def _warn_if_trained_on(images: pd.DataFrame, model_uri: str) -> None:
    """A score over images the model trained (or chose its epoch) on is not a test score."""
    try:
        run_id = reader.source_run_id(model_uri)
    except SkinmlError:
        return  # a model without a training run: nothing to compare with
    seen = image_sets.training_overlap(images, run_id)
    if seen:
        log.warning("%d of these %d images are in the train/val split of run %s: the score "
                    "includes images the model trained on and is not a test score", seen,
                    len(images), run_id)


def labelled_images(options: EvaluateOptions, source_run: str | None) -> pd.DataFrame:
    """image_id, path, label, lesion_id (and sex, age, localization for HAM10000 folders)."""
    if options.split == "isic":
        if options.truth_csv is None or options.data_dir is None:
            raise SkinmlError(ISIC_NEEDS)
        return image_sets.isic_images(options.truth_csv, options.data_dir)
    if options.split == "all":
        return image_sets.folder_images(options.data_dir)
    if source_run is None:
        raise SkinmlError(f"--split {options.split} needs the model's training run")
    return image_sets.run_split_images(source_run, options.split, options.data_dir)


def _gradcam_grid(served, images: pd.DataFrame, scored: ScoredSplit, per_class: int,
                  title: str):
    """Per class: up to `per_class` correct and `per_class` wrong predictions, explained."""
    predicted = scored.probs.argmax(1)
    rows = []
    for cls, name in enumerate(CLASSES):
        cells = []
        for correct in (True, False):
            chosen = np.flatnonzero((scored.labels == cls) & ((predicted == cls) == correct))
            for i in chosen[:per_class]:
                with Image.open(images["path"].iloc[i]) as image:
                    picture, index, p = explain(served, image, served.clinical(images.iloc[[i]]))
                mark = "right" if correct else "WRONG"
                cells.append((picture, f"{mark}: true {name}, pred {CLASSES[index]} {p:.2f}"))
        rows.append(cells)
    return reports.gradcam_grid(rows, title)


def _predictions_table(images: pd.DataFrame, scored: ScoredSplit) -> pd.DataFrame:
    table = pd.DataFrame({"image_id": images["image_id"],
                          "true": [CLASSES[i] for i in scored.labels],
                          "predicted": [CLASSES[i] for i in scored.probs.argmax(1)]})
    for i, column in enumerate(PROBABILITY_COLUMNS):
        table[column] = scored.probs[:, i]
    return table


def _report(options: EvaluateOptions, scored: ScoredSplit, images: pd.DataFrame,
            title: str) -> str:
    per_class = scored.per_class.reset_index()
    parts = [f"# Evaluation: {title}",
             f"Model `{options.model_uri}` on {len(images)} images "
             f"({options.split}{', 8x test-time augmentation' if options.tta else ''}); "
             f"{images['lesion_id'].nunique()} lesions. Confidence intervals: 95 % percentile "
             f"bootstrap over lesions ({options.bootstrap} resamples). Ties for the highest "
             "probability count as wrong, as in the ISIC challenge scorer.",
             "## Headline metrics", reports.metrics_markdown(scored.scores, options.split),
             "## Per class", reports.table_markdown(per_class),
             "Sensitivity/specificity at p > 0.5 follow the ISIC scorer; recall is argmax-based."]
    if scored.subgroups is not None:
        parts += ["## Subgroups (small = fewer than 30 images)",
                  reports.table_markdown(scored.subgroups)]
    parts += ["## Figures",
              "confusion_matrix.png, confusion_matrix_normalized.png, roc_curves.png, "
              "pr_curves.png, reliability_diagram.png, subgroups.png, gradcam_grid.png"]
    return "\n\n".join(parts) + "\n"
