"""Writing runs to MLflow: params, metrics, figures, data, the model. Every run skinml starts
goes through `_start_run`; `reader.py` reads runs back.

The layers below hand over plain values (metric dicts, figures, text, weights); nothing here
knows the training loop or the tuner.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib import pyplot as plt
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from skinml.core.config import Config
from skinml.core.errors import RunInterrupted
from skinml.data.split import SPLITS
from skinml.evaluation import reports
from skinml.evaluation.metrics import Interval
from skinml.evaluation.scoring import ScoredSplit
from skinml.tracking import logged_model
from skinml.tracking.experiments import EVALUATIONS, ROLE_TAG, describe_experiment
from skinml.tracking.reader import dataset_name, logged_models_of
from skinml.tracking.retry import retry_create_race
from skinml.tracking.store import announce_store, open_store, run_link

log = logging.getLogger(__name__)


class RunLog:
    """Logging into one active run; `log_metrics` takes the engine's epochs (step = epoch).

    Log the model before the run's final (step 0) metrics: they then name it and MLflow
    links them to the logged model. Logged after them, `log_model` writes every step-0
    metric a second time to link it, which the store rejects as a duplicate and retries
    (on PostgreSQL, psycopg warns "pipeline aborted" each time).
    """

    def __init__(self, run_id: str, title: str) -> None:
        self.run_id = run_id
        self.title = title
        self.model_id: str | None = None

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
                dataset = from_pandas(subset, source=source, targets="label",
                                      name=dataset_name(name))
                # Trials of workers sharing a store log the same dataset, maybe at once.
                retry_create_race(partial(mlflow.log_input, dataset, context=context),
                                  f"dataset {dataset.name} ({dataset.digest})")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Metrics of one step (an epoch, a fold); NaN values are left out."""
        mlflow.log_metrics(_finite(values), step=step)

    def log_scored_split(self, scored: ScoredSplit, folder: str = "") -> dict[str, float]:
        """`<split>_*` metrics (with CIs and calibration), figures, reports, subgroups;
        the files go into `folder` when a run scores more than one split."""
        split, table = scored.split, scored.per_class
        per_class = {f"{split}_{metric}_{dx}": value for dx, row in table.iterrows()
                     for metric, value in row.items() if metric in ("recall", "auc")}
        self.log_summary({**{f"{split}_{k}": v for k, v in scored.scores.items()},
                          **per_class})
        title = f"{self.title}: {split} split ({len(scored.labels)} images)"
        prefix = f"{folder}/" if folder else ""
        self.log_figures({prefix + name: figure
                          for name, figure in reports.split_figures(scored, title).items()})
        for name, text in reports.split_tables(scored).items():
            mlflow.log_text(text, prefix + name)
        return scored.scores

    def log_figures(self, figures: dict[str, Any]) -> None:
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
            plt.close(figure)

    def log_text(self, text: str, name: str) -> None:
        mlflow.log_text(text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on this run, also while a run nested under it is the active one."""
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)

    def log_summary(self, values: dict[str, float]) -> None:
        """Final metrics (step 0), linked to the logged model when there is one."""
        mlflow.log_metrics(_finite(values), model_id=self.model_id)

    def log_model(self, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                  example_image: str, members: list[dict[str, Any]] | None = None,
                  example_clinical: dict[str, Any] | None = None) -> str:
        """The pyfunc model named `model`; `example_image` is a file for its input example
        (`example_clinical` its age, sex and localization); `members` make it an ensemble."""
        self._drop_interrupted_model()
        info = logged_model.log_model(weights, meta, example_image, members, example_clinical)
        self.model_id = info.model_id
        return info.model_uri

    def _drop_interrupted_model(self) -> None:
        """A run logs one model: one that an interrupted attempt of this run left behind
        (finished or half-written) is deleted before the resumed run logs its own."""
        experiment = mlflow.get_run(self.run_id).info.experiment_id
        for model in logged_models_of(self.run_id, experiment):
            log.info("deleting model %s, left by the interrupted attempt of run %s",
                     model.model_id, self.run_id)
            MlflowClient().delete_logged_model(model.model_id)


@contextlib.contextmanager
def _start_run(experiment: str, name: str, role: str, tags: dict[str, str] | None = None,
               resume_run_id: str | None = None, nested: bool = False,
               system_metrics: bool = False, parent_run_id: str | None = None
               ) -> Iterator[RunLog]:
    """The one way skinml starts (or resumes) a run: experiment, role and provenance tags.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and keeps its experiment; a
    nested run (under the active run, or under `parent_run_id` from another process) goes
    where its parent is; otherwise the run goes to `experiment`, created on first use. A
    resumed run keeps the tags it has. System metrics are logged on the outermost run only
    (a study's or a cross-validation's covers its trials and folds).
    """
    announce_store()
    open_store()  # commands started together on a fresh store race to create its tables
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if nested and active is not None else None)
    experiment_id = None
    if resume_run_id is None and parent is not None:
        experiment_id = MlflowClient().get_run(parent).info.experiment_id
    elif resume_run_id is None and active is None and not _launched_by_mlflow_run():
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id,
                          run_name=None if resume_run_id else name,
                          nested=nested or parent_run_id is not None,
                          parent_run_id=parent_run_id if resume_run_id is None else None,
                          log_system_metrics=system_metrics and parent is None) as run:
        run_id = run.info.run_id
        describe_experiment(run.info.experiment_id, role)
        if resume_run_id is None:
            mlflow.set_tags({"mlflow.runName": name, ROLE_TAG: role, **_git_tags(),
                             **(tags or {})})
        log.info("%s run %s %s: %s", role, run_id, "resumed" if resume_run_id else "started",
                 run_link(run.info.experiment_id, run_id))
        try:
            yield RunLog(run_id, mlflow.get_run(run_id).info.run_name)
        except KeyboardInterrupt:  # Ctrl-C: KILLED (MLflow would say FAILED), and whose
            mlflow.end_run("KILLED")  # run it was: the outermost run a user resumes
            raise RunInterrupted(run_id) from None


def training_run(config: Config, run_name: str, resume_run_id: str | None = None,
                 nested: bool = False, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None) -> contextlib.AbstractContextManager[RunLog]:
    """The run a training logs into (or the killed run it resumes)."""
    return _start_run(config.runtime.experiment, run_name, "training", tags, resume_run_id,
                      nested, system_metrics=_system_metrics(), parent_run_id=parent_run_id)


@contextlib.contextmanager
def reopened_run(run_id: str) -> Iterator[RunLog]:
    """A finished run opened again to log what was deferred (a study's best trial's model);
    it ends as it was: FINISHED, at the time it finished (its duration stays its training's)."""
    ended = MlflowClient().get_run(run_id).info.end_time
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None,
                          log_system_metrics=False) as run:
        yield RunLog(run_id, run.info.run_name)
    MlflowClient().set_terminated(run_id, status="FINISHED", end_time=ended)


def log_run_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Metrics on a run that may have ended (a trial's time outside its epochs)."""
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(key, value, now, step)
                                              for key, value in _finite(values).items()])


@contextlib.contextmanager
def cv_run(config: Config, run_name: str, folds: int, resume_run_id: str | None = None,
           nested: bool = False, tags: dict[str, str] | None = None,
           parent_run_id: str | None = None) -> Iterator[RunLog]:
    """The parent run of a cross-validation (its folds' training runs nest under it); itself
    nested when it is a tuning trial."""
    with _start_run(config.runtime.experiment, run_name, "cv",
                    {"skinml.cv_folds": str(folds), **(tags or {})}, resume_run_id,
                    nested, system_metrics=_system_metrics(),
                    parent_run_id=parent_run_id) as parent:
        if "cv.folds" not in mlflow.get_run(parent.run_id).data.params:
            mlflow.log_param("cv.folds", folds)
        yield parent


def _system_metrics() -> bool:
    return importlib.util.find_spec("psutil") is not None


def _launched_by_mlflow_run() -> bool:
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def _git_tags() -> dict[str, str]:
    """The commit of the skinml checkout, when there is one (mlflow run adds its own)."""
    active = mlflow.active_run()
    if active and "mlflow.source.git.commit" in active.data.tags:
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


@contextlib.contextmanager
def study_run(experiment: str, study_name: str, storage: str, options: dict[str, Any]
              ) -> Iterator[str]:
    """The parent run of one tuning worker: trials nest under it. Yields its run id.

    Under `mlflow run -e tune` the project's run is the parent.
    """
    with _start_run(experiment, study_name, "study", {"optuna.study_name": study_name,
                                                      "optuna.storage": storage},
                    nested=mlflow.active_run() is not None,  # a pipeline's stage
                    system_metrics=_system_metrics()) as run:
        logged = mlflow.get_run(run.run_id).data.params
        mlflow.log_params({f"tune.{k}": "" if v is None else v for k, v in options.items()
                           if f"tune.{k}" not in logged and k not in logged})
        yield run.run_id


@contextlib.contextmanager
def pipeline_run(experiment: str, name: str, resume_run_id: str | None = None
                 ) -> Iterator[RunLog]:
    """The parent run of `skinml pipeline`: its study, cross-validation and registration
    nest under it (or the killed one it continues; its RUNNING children are marked KILLED:
    their process is gone)."""
    if resume_run_id is not None:
        for child in MlflowClient().search_runs(
                [MlflowClient().get_run(resume_run_id).info.experiment_id],
                f"tags.`mlflow.parentRunId` = '{resume_run_id}' and "
                "attributes.status = 'RUNNING'"):
            mark_killed(child.info.run_id)
    with _start_run(experiment, name, "pipeline", resume_run_id=resume_run_id,
                    system_metrics=_system_metrics()) as run:
        yield run


def attach_model_file(model_id: str, name: str, text: str) -> None:
    """A text file among a logged model's own artifacts (the model card of a version)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        MlflowClient().log_model_artifact(model_id, str(path))


def mark_trial(run_id: str, state: str) -> None:
    """Mirror an Optuna trial's final state on its run; a pruned run must not look finished."""
    client = MlflowClient()
    client.set_tag(run_id, "optuna.trial_state", state)
    if state == "PRUNED":
        client.set_terminated(run_id, status="KILLED")
    elif state == "FAIL":
        client.set_terminated(run_id, status="FAILED")


def mark_killed(run_id: str) -> None:
    """End a run whose process was killed (SIGKILL leaves it RUNNING for ever)."""
    MlflowClient().set_terminated(run_id, status="KILLED")


def log_verdict(line: str, delta: Interval, detail: str) -> None:
    """On the active parent run: the study's verdict as a tag, Δ metrics and verdict.txt."""
    mlflow.set_tag("skinml.verdict", line)
    mlflow.log_metrics({"verdict_delta_balanced_accuracy": delta.value,
                        "verdict_delta_balanced_accuracy_ci_low": delta.low,
                        "verdict_delta_balanced_accuracy_ci_high": delta.high})
    mlflow.log_text(f"{line}\n{detail}\n", "verdict.txt")


def log_study_summary(best_value: float | None, best_params: dict[str, Any],
                      counts: dict[str, int], figures: dict[str, Any],
                      search_space: str, pruned_epochs_saved: int) -> None:
    """On the active parent run: best value and params, trial counts, epochs that pruning
    saved, Optuna's figures."""
    values: dict[str, float] = {f"trials_{state.lower()}": n for state, n in counts.items()}
    values["pruned_epochs_saved"] = pruned_epochs_saved
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
def evaluation_run(experiment: str, model_uri: str, split: str, params: dict[str, Any],
                   source_run: str | None) -> Iterator[RunLog]:
    """The run an evaluation logs into, tagged with the model it judged; `params` are logged
    as `eval.<name>` (None as an empty string)."""
    name = f"evaluate-{split}-{model_uri.rsplit('/', 1)[-1]}"
    tags = {"skinml.model_uri": model_uri}
    if source_run:
        tags["skinml.source_run_id"] = source_run
    with _start_run(EVALUATIONS.format(experiment=experiment), name, "evaluation",
                    tags) as run:
        mlflow.log_params({f"eval.{k}": "" if v is None else v for k, v in params.items()})
        yield run


@contextlib.contextmanager
def comparison_run(experiment: str, uri_a: str, uri_b: str, params: dict[str, Any]
                   ) -> Iterator[RunLog]:
    """The run `skinml compare` logs into, tagged with the two models it compared."""
    name = f"compare-{uri_a.rsplit('/', 1)[-1]}-vs-{uri_b.rsplit('/', 1)[-1]}"
    with _start_run(EVALUATIONS.format(experiment=experiment), name, "comparison",
                    {"skinml.model_uri_a": uri_a, "skinml.model_uri_b": uri_b}) as run:
        mlflow.log_params({f"compare.{k}": "" if v is None else v for k, v in params.items()})
        yield run
