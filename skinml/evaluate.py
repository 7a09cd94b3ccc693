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

from skinml import reports, tracking
from skinml.calibration import apply_temperature
from skinml.data.metadata import default_data_dir, find_images, load_ham10000
from skinml.errors import SkinmlError
from skinml.evaluation import Evaluation, evaluate_predictions, subgroup_attributes
from skinml.explain import explain
from skinml.labels import CLASS_INDEX, CLASSES
from skinml.packaging import ISIC_COLUMNS, encode_image, load_model
from skinml.registry import source_run_id

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "all", "isic")
_CHUNK = 256


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
    evaluation: Evaluation
    report: str


def evaluate_model(options: EvaluateOptions) -> EvaluateResult:
    if options.split not in SPLITS:
        raise SkinmlError(f"--split must be one of {', '.join(SPLITS)}, got {options.split!r}")
    if options.split == "isic" and (options.truth_csv is None or options.data_dir is None):
        raise SkinmlError("--split isic needs --truth GROUND_TRUTH.csv and --data-dir IMAGES")
    model = load_model(options.model_uri)
    served = model.unwrap_python_model()
    source = source_run_id(options.model_uri) if options.split in ("test", "val") else None
    images = labelled_images(options, source)
    log.info("evaluating %s on %d images (%s)", options.model_uri, len(images), options.split)
    probs = _predict(model, images["path"].tolist(), options.tta)
    # The served probabilities are softmax(z / T); softmax(T * log p) recovers softmax(z).
    uncalibrated = apply_temperature(probs, 1 / served.temperature)
    attributes = subgroup_attributes(images) if "sex" in images else None
    evaluation = evaluate_predictions(options.split, images["label"].to_numpy(), uncalibrated,
                                      served.temperature, images["lesion_id"].to_numpy(),
                                      attributes, n_boot=options.bootstrap)
    with tracking.evaluation_run(options, source) as run:
        run.log_evaluation(evaluation)
        run.log_figures({"gradcam_grid.png": _gradcam_grid(served, images, evaluation,
                                                           options.gradcam_per_class,
                                                           run.title)})
        report = _report(options, evaluation, images, run.title)
        run.log_text(report, "evaluation_report.md")
        run.log_text(_predictions_table(images, evaluation).to_csv(index=False),
                     "predictions.csv")
    return EvaluateResult(run.run_id, evaluation, report)


def labelled_images(options: EvaluateOptions, source_run: str | None) -> pd.DataFrame:
    """image_id, path, label, lesion_id (and sex, age, localization for HAM10000 folders)."""
    if options.split == "isic":
        return _isic_images(options)
    data_dir = options.data_dir
    if data_dir is None and source_run is not None:
        data_dir = tracking.run_params(source_run).get("data.dir") or None
    frame = load_ham10000(data_dir or default_data_dir())
    if options.split == "all":
        return frame
    split = tracking.run_table(source_run, "split.csv")
    if split is None:
        raise SkinmlError(f"run {source_run} has no split.csv: it is not a skinml training run")
    wanted = split.loc[split["split"] == options.split, "image_id"]
    missing = sorted(set(wanted) - set(frame["image_id"]))
    if missing:
        raise SkinmlError(f"{len(missing)} of the {len(wanted)} {options.split} images of run "
                          f"{source_run} are not in {data_dir or default_data_dir()} "
                          f"(first: {', '.join(missing[:3])}); pass the training --data-dir")
    return frame[frame["image_id"].isin(set(wanted))].reset_index(drop=True)


def _isic_images(options: EvaluateOptions) -> pd.DataFrame:
    """ISIC 2018 Task 3: image folder + ground-truth CSV (image, MEL, NV, ... one-hot)."""
    path = Path(options.truth_csv)
    try:
        truth = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SkinmlError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") \
            from None
    absent = [c for c in ["image", *ISIC_COLUMNS] if c not in truth.columns]
    if absent:
        raise SkinmlError(f"{path}: missing column(s) {', '.join(absent)}")
    onehot = truth[list(ISIC_COLUMNS)].to_numpy(dtype=float)
    bad = np.flatnonzero((onehot.sum(1) != 1) | ~np.isin(onehot, (0.0, 1.0)).all(1))
    if len(bad):
        raise SkinmlError(f"{path}: line {bad[0] + 2} is not one-hot over "
                          f"{', '.join(ISIC_COLUMNS)} ({len(bad)} rows in all)")
    files = find_images(Path(options.data_dir).expanduser())
    ids = truth["image"].astype(str).str.replace(r"\.jpg$", "", regex=True, case=False)
    missing = [i for i in ids if i not in files]
    if missing:
        raise SkinmlError(f"{len(missing)} images of {path} are not in {options.data_dir} "
                          f"(first: {', '.join(missing[:3])})")
    dx = [ISIC_COLUMNS[c] for c in np.array(list(ISIC_COLUMNS))[onehot.argmax(1)]]
    return pd.DataFrame({"image_id": ids, "path": [str(files[i]) for i in ids],
                         "label": [CLASS_INDEX[d] for d in dx], "dx": dx,
                         "lesion_id": ids})  # no lesion ids in ISIC 2018: resample images


def _predict(model, paths: list[str], tta: bool) -> np.ndarray:
    chunks = []
    for start in range(0, len(paths), _CHUNK):
        frame = pd.DataFrame({"image": [encode_image(Path(p).read_bytes())
                                        for p in paths[start:start + _CHUNK]]})
        table = model.predict(frame, params={"tta": tta})
        chunks.append(table[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=np.float64))
    return np.concatenate(chunks)


def _gradcam_grid(served, images: pd.DataFrame, evaluation: Evaluation, per_class: int,
                  title: str):
    """Per class: up to `per_class` correct and `per_class` wrong predictions, explained."""
    predicted = evaluation.probs.argmax(1)
    rows = []
    for cls, name in enumerate(CLASSES):
        cells = []
        for correct in (True, False):
            chosen = np.flatnonzero((evaluation.labels == cls) & ((predicted == cls) == correct))
            for i in chosen[:per_class]:
                with Image.open(images["path"].iloc[i]) as image:
                    picture, index, p = explain(served, image)
                mark = "right" if correct else "WRONG"
                cells.append((picture, f"{mark}: true {name}, pred {CLASSES[index]} {p:.2f}"))
        rows.append(cells)
    return reports.gradcam_grid(rows, title)


def _predictions_table(images: pd.DataFrame, evaluation: Evaluation) -> pd.DataFrame:
    table = pd.DataFrame({"image_id": images["image_id"],
                          "true": [CLASSES[i] for i in evaluation.labels],
                          "predicted": [CLASSES[i] for i in evaluation.probs.argmax(1)]})
    for i, name in enumerate(CLASSES):
        table[f"p_{name}"] = evaluation.probs[:, i]
    return table


def _report(options: EvaluateOptions, evaluation: Evaluation, images: pd.DataFrame,
            title: str) -> str:
    per_class = evaluation.per_class.reset_index()
    parts = [f"# Evaluation: {title}",
             f"Model `{options.model_uri}` on {len(images)} images "
             f"({options.split}{', 8x test-time augmentation' if options.tta else ''}); "
             f"{images['lesion_id'].nunique()} lesions. Confidence intervals: 95 % percentile "
             f"bootstrap over lesions ({options.bootstrap} resamples). Ties for the highest "
             "probability count as wrong, as in the ISIC challenge scorer.",
             "## Headline metrics", reports.metrics_markdown(evaluation.scores, options.split),
             "## Per class", reports.table_markdown(per_class),
             "Sensitivity/specificity at p > 0.5 follow the ISIC scorer; recall is argmax-based."]
    if evaluation.subgroups is not None:
        parts += ["## Subgroups (small = fewer than 30 images)",
                  reports.table_markdown(evaluation.subgroups)]
    parts += ["## Figures",
              "confusion_matrix.png, confusion_matrix_normalized.png, roc_curves.png, "
              "pr_curves.png, reliability_diagram.png, subgroups.png, gradcam_grid.png"]
    return "\n\n".join(parts) + "\n"
