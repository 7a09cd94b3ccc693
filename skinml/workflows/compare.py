"""Two models judged on the same labelled images, with a paired lesion bootstrap of the
difference in balanced accuracy. `skinml compare` and the registry's promotion gate.

Two models are compared only on the same images: their shared test split when both runs
split the same data the same way, otherwise every image of a folder the user names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinml.core.errors import SkinmlError
from skinml.evaluation import reports
from skinml.evaluation.metrics import PairedComparison, paired_balanced_accuracy
from skinml.tracking import reader
from skinml.tracking.logged_model import load_model, predict_paths
from skinml.tracking.writer import comparison_run
from skinml.workflows import image_sets

log = logging.getLogger(__name__)

ROUNDS = 2000  # paired bootstrap rounds: the gate's decision sits on a percentile
SETS = ("test", "all")


class NotSameSplit(SkinmlError):
    """Two runs split their data differently: their test splits are different images."""


@dataclass(frozen=True)
class ImageSet:
    """Labelled images two models are judged on, and how to name them in a record."""

    images: pd.DataFrame  # image_id, path, label, lesion_id, ...
    description: str
    digest: str

    @property
    def lesions(self) -> int:
        return int(self.images["lesion_id"].nunique())

    def summary(self) -> str:
        return (f"{len(self.images)} images / {self.lesions} lesions ({self.description}, "
                f"digest {self.digest[:12]})")


@dataclass(frozen=True)
class ModelComparison:
    uri_a: str
    uri_b: str
    image_set: ImageSet
    result: PairedComparison
    seed: int

    def line(self) -> str:
        return (f"Δ balanced accuracy {self.result.delta.signed()} on "
                f"{self.image_set.summary()}")


def shared_split(run_a: str, run_b: str, split: str = "test",
                 data_dir: str | Path | None = None) -> ImageSet:
    """The `split` images both runs share; an error when their splits are not the same."""
    if not reader.same_split(run_a, run_b):
        raise NotSameSplit(f"runs {run_a} and {run_b} were not trained on the same split (data "
                          f"digests and split seed differ or were not logged), so their {split} "
                          "splits hold different images")
    images = image_sets.run_split_images(run_a, split, data_dir)
    return ImageSet(images, f"{split} split shared by runs {run_a} and {run_b}",
                    image_sets.digest(images))


def folder_set(data_dir: str | Path | None, runs: dict[str, str]) -> ImageSet:
    """Every image of a labelled folder; warns when a model trained on some of them."""
    images = image_sets.folder_images(data_dir)
    for name, run_id in runs.items():
        seen = image_sets.training_overlap(images, run_id)
        if seen:
            log.warning("%d of the %d images were in the training or validation split of %s "
                        "(run %s): the comparison favours that model", seen, len(images), name,
                        run_id)
    where = str(data_dir) if data_dir else "the bundled sample"
    return ImageSet(images, f"all of {where}", image_sets.digest(images))


def compare_models(uri_a: str, uri_b: str, image_set: ImageSet, rounds: int = ROUNDS,
                   seed: int = 0) -> ModelComparison:
    """Both models' served probabilities on the set, and the paired bootstrap of A - B."""
    images = image_set.images
    paths = images["path"].tolist()
    log.info("comparing %s and %s on %s", uri_a, uri_b, image_set.summary())
    # The same images, each with its age, sex and body site for a model that reads them.
    probs_a = predict_paths(load_model(uri_a), paths, clinical=images)
    probs_b = predict_paths(load_model(uri_b), paths, clinical=images)
    result = paired_balanced_accuracy(images["label"].to_numpy(), probs_a, probs_b,
                                      images["lesion_id"].to_numpy(), n_boot=rounds, seed=seed)
    return ModelComparison(uri_a, uri_b, image_set, result, seed)


@dataclass(frozen=True)
class CompareOptions:
    uri_a: str
    uri_b: str
    data_dir: str | None = None
    split: str = "test"
    rounds: int = ROUNDS
    seed: int = 0
    experiment: str = "skin-lesion"


def compare(options: CompareOptions) -> tuple[ModelComparison, str]:
    """`skinml compare`: judge both models on one set and log the comparison as a run."""
    if options.split not in SETS:
        raise SkinmlError(f"--split must be one of {', '.join(SETS)}, got {options.split!r}")
    for uri in (options.uri_a, options.uri_b):  # a missing run or model, said as such
        reader.require_model(uri)
    runs = {"A": reader.source_run_id(options.uri_a),
            "B": reader.source_run_id(options.uri_b)}
    if options.split == "all":
        image_set = folder_set(options.data_dir, runs)
    else:
        try:
            image_set = shared_split(runs["A"], runs["B"], "test", options.data_dir)
        except NotSameSplit as exc:
            raise SkinmlError(f"{exc}: compare them on a folder neither trained on with "
                              "--split all --data-dir DIR") from None
    comparison = compare_models(options.uri_a, options.uri_b, image_set, options.rounds,
                                options.seed)
    params = {"model_a": options.uri_a, "model_b": options.uri_b, "split": options.split,
              "data_dir": options.data_dir, "rounds": options.rounds, "seed": options.seed,
              "set_digest": image_set.digest, "set_images": len(image_set.images),
              "set_lesions": image_set.lesions}
    with comparison_run(options.experiment, options.uri_a, options.uri_b,
                                 params) as run:
        result = comparison.result
        run.log_summary(comparison_metrics(result))
        run.log_figures({"comparison.png": reports.comparison_figure(
            result, "A", "B", f"{run.title}: A = {options.uri_a}, B = {options.uri_b}")})
        run.log_text(report(comparison), "comparison.md")
        run.log_text(result.per_class.to_csv(), "per_class_recall.csv")
    return comparison, run.run_id


def comparison_metrics(result: PairedComparison) -> dict[str, float]:
    values = {}
    for prefix, interval in (("a_", result.a), ("b_", result.b), ("delta_", result.delta)):
        values[f"{prefix}balanced_accuracy"] = interval.value
        values[f"{prefix}balanced_accuracy_ci_low"] = interval.low
        values[f"{prefix}balanced_accuracy_ci_high"] = interval.high
    for dx, row in result.per_class.iterrows():
        values[f"a_recall_{dx}"], values[f"b_recall_{dx}"] = row["recall_a"], row["recall_b"]
    return values


def per_class_text(result: PairedComparison) -> str:
    """Per-class recall of A and B side by side, with the paired Δ and its interval."""
    table = result.per_class
    lines = [f"{'class':7}{'images':>7}{'recall A':>10}{'recall B':>10}   Δ (95 % CI)"]
    for dx, row in table.iterrows():
        delta = (f"{row['delta']:+.3f} ({row['delta_low']:+.3f} to {row['delta_high']:+.3f})"
                 if row["support"] else "no images")
        lines.append(f"{dx:7}{int(row['support']):7d}{row['recall_a']:10.3f}"
                     f"{row['recall_b']:10.3f}   {delta}")
    return "\n".join(lines)


def report(comparison: ModelComparison) -> str:
    result = comparison.result
    return "\n\n".join([
        "# Paired comparison",
        f"A = `{comparison.uri_a}`, B = `{comparison.uri_b}`, judged on "
        f"{comparison.image_set.summary()}; full digest `{comparison.image_set.digest}`.",
        f"- balanced accuracy A: {result.a}",
        f"- balanced accuracy B: {result.b}",
        f"- Δ = A - B: {result.delta.signed()}",
        f"Intervals: 95 % percentile bootstrap over lesions, {result.rounds} rounds (seed "
        f"{comparison.seed}), the same resampled lesions for both models in every round.",
        "## Per-class recall",
        reports.table_markdown(result.per_class.reset_index()),
    ]) + "\n"
