"""The one place that logs runs to MLflow: params, per-epoch metrics, figures, data, model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib import pyplot as plt
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from skinml import metrics, packaging, reports
from skinml.config import Config
from skinml.engine import EpochResult
from skinml.errors import SkinmlError
from skinml.evaluation import Evaluation

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI opens it in Model training view
ROLE_TAG = "skinml.role"  # training, study, evaluation or comparison: what a run is for
SPLITS = ("train", "val", "test")


class TrainingRun:
    """Logging for one training run; `log_epoch` is the engine's epoch callback."""

    def __init__(self, run: mlflow.ActiveRun, title: str) -> None:
        self.run = run
        self.run_id = run.info.run_id
        self.title = title

    def log_config(self, config: Config) -> None:
        """The resolved config as params (dotted names) and as config.yaml.

        Keys already on the run (a resumed run, or `mlflow run`'s own entry-point
        parameters) are left alone: MLflow refuses to change a logged param.
        """
        logged = mlflow.get_run(self.run_id).data.params
        params = {k: "" if v is None else v for k, v in config.flat().items() if k not in logged}
        if params:
            mlflow.log_params(params)
        mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")

    def log_data(self, frame: pd.DataFrame, split: pd.Series, source: str) -> None:
        """split.csv and one MLflow dataset input (with digest) per split."""
        table = frame[["image_id", "lesion_id", "dx"]].assign(split=split.to_numpy())
        mlflow.log_text(table.to_csv(index=False), "split.csv")
        columns = ["image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex",
                   "localization"]
        contexts = {"train": "training", "val": "validation", "test": "testing"}
        for name in SPLITS:
            context = contexts[name]
            subset = frame.loc[split.to_numpy() == name, columns].reset_index(drop=True)
            with warnings.catch_warnings():
                # MLflow's hints about int columns and its two local-source readers say
                # nothing about this data.
                warnings.filterwarnings("ignore", message=".*(integer column|multiple ways)")
                dataset = mlflow.data.from_pandas(subset, source=source, targets="label",
                                                  name=_dataset_name(name))
                mlflow.log_input(dataset, context=context)

    def log_epoch(self, result: EpochResult) -> None:
        values = {"train_loss": result.train_loss, "val_loss": result.val_loss,
                  **{f"val_{k}": v for k, v in result.val.items()},
                  "lr": result.lr, "epoch_seconds": result.epoch_seconds,
                  "train_images_per_second": result.train_images_per_second}
        mlflow.log_metrics(_finite(values), step=result.epoch)

    def log_evaluation(self, evaluation: Evaluation) -> dict[str, float]:
        """`<split>_*` metrics (with CIs and calibration), figures, reports, subgroups."""
        split, labels, probs = evaluation.split, evaluation.labels, evaluation.probs
        table = evaluation.per_class
        per_class = {f"{split}_{metric}_{dx}": value for dx, row in table.iterrows()
                     for metric, value in row.items() if metric in ("recall", "auc")}
        mlflow.log_metrics(_finite({**{f"{split}_{k}": v for k, v in evaluation.scores.items()},
                                    **per_class}))
        title = f"{self.title}: {split} split ({len(labels)} images)"
        figures = {
            "confusion_matrix.png": reports.confusion_matrix_figure(labels, probs, title),
            "confusion_matrix_normalized.png": reports.confusion_matrix_figure(
                labels, probs, title, normalize=True),
            "roc_curves.png": reports.roc_figure(labels, probs, title),
            "pr_curves.png": reports.pr_figure(labels, probs, title),
            "reliability_diagram.png": reports.reliability_figure(
                labels, evaluation.uncalibrated, probs, evaluation.temperature, title),
        }
        if evaluation.subgroups is not None:
            figures["subgroups.png"] = reports.subgroup_figure(evaluation.subgroups, title)
            mlflow.log_text(evaluation.subgroups.to_csv(index=False), "subgroups.csv")
        self.log_figures(figures)
        mlflow.log_text(metrics.classification_report(labels, probs), "classification_report.txt")
        mlflow.log_dict(metrics.classification_report(labels, probs, as_dict=True),
                        "classification_report.json")
        mlflow.log_text(table.to_csv(), "per_class_metrics.csv")
        return evaluation.scores

    def log_figures(self, figures: dict[str, Any]) -> None:
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
            plt.close(figure)

    def log_text(self, text: str, name: str) -> None:
        mlflow.log_text(text, name)

    def log_summary(self, values: dict[str, float]) -> None:
        mlflow.log_metrics(_finite(values))

    def log_model(self, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                  example_image: bytes) -> str:
        info = packaging.log_model(weights, meta, example_image)
        return info.model_uri


@contextlib.contextmanager
def training_run(config: Config, run_name: str, resume_run_id: str | None = None,
                 nested: bool = False, tags: dict[str, str] | None = None
                 ) -> Iterator[TrainingRun]:
    """Start (or resume) the MLflow run that a training logs into.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and keeps its experiment;
    otherwise the run goes to `runtime.experiment`, created on first use.
    """
    if resume_run_id is None and mlflow.active_run() is None and not _launched_by_mlflow_run():
        mlflow.set_experiment(config.runtime.experiment)
    with mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name,
                          nested=nested, log_system_metrics=_system_metrics()) as run:
        _tag_experiment(run.info.experiment_id)
        if resume_run_id is None:
            mlflow.set_tags({"mlflow.runName": run_name, ROLE_TAG: "training", **_git_tags(),
                             **(tags or {})})
        yield TrainingRun(run, mlflow.get_run(run.info.run_id).info.run_name)


def _open_store(attempts: int = 5) -> None:
    """Touch the tracking store once, so its tables exist before any run starts.

    Workers started together on a fresh database race to create MLflow's tables; the
    loser's CREATE fails on a unique constraint and simply tries again.
    """
    for attempt in range(1, attempts + 1):
        try:
            MlflowClient().search_experiments(max_results=1)
            return
        except Exception as exc:
            racing = "already exists" in str(exc) or "duplicate key" in str(exc)
            if not racing or attempt == attempts:
                raise
            log.info("tracking tables are being created by another process; retrying")
            time.sleep(0.5 * attempt)


def _system_metrics() -> bool:
    return importlib.util.find_spec("psutil") is not None


def _launched_by_mlflow_run() -> bool:
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def _tag_experiment(experiment_id: str) -> None:
    client = MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _git_tags() -> dict[str, str]:
    """The commit of the skinml checkout, when there is one (mlflow run adds its own)."""
    if mlflow.active_run() and "mlflow.source.git.commit" in mlflow.active_run().data.tags:
        return {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip()}


def _finite(values: dict[str, float]) -> dict[str, float]:
    """NaN metrics (a class absent from a split) are left out rather than logged as NaN."""
    return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}


def example_image_bytes(path: str, max_side: int = 96) -> bytes:
    """A small JPEG of a real image, stored with the model as its input example."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@contextlib.contextmanager
def study_run(experiment: str, study_name: str, storage: str, options: dict[str, Any]
              ) -> Iterator[str]:
    """The parent run of one tuning worker: trials nest under it. Yields its run id.

    Under `mlflow run -e tune` the project's run is the parent.
    """
    _open_store()
    if mlflow.active_run() is None and not _launched_by_mlflow_run():
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=study_name) as run:
        _tag_experiment(run.info.experiment_id)
        mlflow.set_tags({"mlflow.runName": study_name, "optuna.study_name": study_name,
                         "optuna.storage": storage, ROLE_TAG: "study", **_git_tags()})
        logged = mlflow.get_run(run.info.run_id).data.params
        mlflow.log_params({f"tune.{k}": "" if v is None else v for k, v in options.items()
                           if f"tune.{k}" not in logged and k not in logged})
        yield run.info.run_id


def mark_trial(run_id: str, state: str) -> None:
    """Mirror an Optuna trial's final state on its run; a pruned run must not look finished."""
    client = MlflowClient()
    client.set_tag(run_id, "optuna.trial_state", state)
    if state == "PRUNED":
        client.set_terminated(run_id, status="KILLED")
    elif state == "FAIL":
        client.set_terminated(run_id, status="FAILED")


def log_study_summary(best_value: float | None, best_params: dict[str, Any],
                      counts: dict[str, int], figures: dict[str, Any],
                      search_space: str) -> None:
    """On the active parent run: best value and params, trial counts, Optuna's figures."""
    values = {f"trials_{state.lower()}": n for state, n in counts.items()}
    if best_value is not None:
        values["best_val_balanced_accuracy"] = best_value
    mlflow.log_metrics(_finite(values))
    if best_params:
        mlflow.log_dict(best_params, "best_params.json")
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best_params.items()})
    mlflow.log_artifact(search_space)
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)


@contextlib.contextmanager
def evaluation_run(options, source_run: str | None) -> Iterator[TrainingRun]:
    """The run an evaluation logs into, tagged with the model it judged."""
    if mlflow.active_run() is None and not _launched_by_mlflow_run():
        mlflow.set_experiment(options.experiment)
    name = f"evaluate-{options.split}-{options.model_uri.rsplit('/', 1)[-1]}"
    with mlflow.start_run(run_name=name) as run:
        _tag_experiment(run.info.experiment_id)
        tags = {"mlflow.runName": name, ROLE_TAG: "evaluation",
                "skinml.model_uri": options.model_uri, **_git_tags()}
        if source_run:
            tags["skinml.source_run_id"] = source_run
        mlflow.set_tags(tags)
        mlflow.log_params({"eval.split": options.split, "eval.tta": options.tta,
                           "eval.bootstrap": options.bootstrap,
                           "eval.data_dir": options.data_dir or "",
                           "eval.truth_csv": str(options.truth_csv or "")})
        yield TrainingRun(run, name)


@contextlib.contextmanager
def comparison_run(experiment: str, uri_a: str, uri_b: str, params: dict[str, Any]
                   ) -> Iterator[TrainingRun]:
    """The run `skinml compare` logs into, tagged with the two models it compared."""
    if mlflow.active_run() is None and not _launched_by_mlflow_run():
        mlflow.set_experiment(experiment)
    name = f"compare-{uri_a.rsplit('/', 1)[-1]}-vs-{uri_b.rsplit('/', 1)[-1]}"
    with mlflow.start_run(run_name=name) as run:
        _tag_experiment(run.info.experiment_id)
        mlflow.set_tags({"mlflow.runName": name, ROLE_TAG: "comparison",
                         "skinml.model_uri_a": uri_a, "skinml.model_uri_b": uri_b,
                         **_git_tags()})
        mlflow.log_params({f"compare.{k}": "" if v is None else v for k, v in params.items()})
        yield TrainingRun(run, name)


def run_params(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.params


def download_run_artifact(run_id: str, path: str) -> str:
    try:
        return MlflowClient().download_artifacts(run_id, path)
    except (mlflow.exceptions.MlflowException, OSError):
        raise SkinmlError(f"run {run_id} has no artifact {path}") from None


def same_split(run_a: str, run_b: str) -> bool:
    """Whether two training runs logged the same data digests and split seed."""
    client = MlflowClient()
    first, second = (split_signature(client.get_run(r)) for r in (run_a, run_b))
    return first is not None and first == second


def split_signature(run: Run) -> tuple[str, ...] | None:
    """What makes two runs' splits the same images: the digest of each logged split's data
    and the split seed. None when the run did not log them all (then nothing is assumed)."""
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    seed = run.data.params.get("data.split_seed")
    names = [_dataset_name(split) for split in SPLITS]
    if seed is None or any(name not in digests for name in names):
        return None
    return (*(f"{name}:{digests[name]}" for name in names), f"data.split_seed:{seed}")


def _dataset_name(split: str) -> str:
    return f"ham10000-{split}"


def run_table(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame, or None when the run has no such file."""
    try:
        return pd.read_csv(download_run_artifact(run_id, path))
    except SkinmlError:
        return None


def source_run_id(model_uri: str) -> str:
    """The training run behind runs:/ID/..., models:/NAME/VERSION, @ALIAS or models:/m-ID."""
    client = MlflowClient()
    try:
        if model_uri.startswith("runs:/"):
            return model_uri.removeprefix("runs:/").split("/", 1)[0]
        target = model_uri.removeprefix("models:/")
        if target.startswith("m-"):
            return client.get_logged_model(target.split("/", 1)[0]).source_run_id
        if "@" in target:
            model, alias = target.split("@", 1)
            return client.get_model_version_by_alias(model, alias).run_id
        model, version = target.rsplit("/", 1)
        return client.get_model_version(model, version).run_id
    except (MlflowException, ValueError):
        raise SkinmlError(f"cannot find the run behind model {model_uri}") from None
