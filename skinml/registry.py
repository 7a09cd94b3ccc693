"""Model Registry: register a run's model, alias `challenger` always, `champion` only if better.

Aliases, not stages (deprecated in MLflow 3). The champion's score is read right before the
alias moves, so two registrations racing cannot demote a better model silently.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from skinml import model_card, tracking
from skinml.errors import SkinmlError

log = logging.getLogger(__name__)

DEFAULT_NAME = "skin-lesion-classifier"
DEFAULT_METRIC = "test_balanced_accuracy"
CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(SkinmlError):
    """A run, experiment or model version cannot be found or used."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    score: float
    champion: bool
    reason: str

    def summary(self) -> str:
        aliases = f"{CHALLENGER}, {CHAMPION}" if self.champion else CHALLENGER
        return (f"registered {self.name} version {self.version} from run {self.run_id} "
                f"({DEFAULT_METRIC} {self.score:.4f}): aliases {aliases}; {self.reason}")


def best_run(experiment: str, metric: str = DEFAULT_METRIC) -> Run:
    """The finished run of `experiment` with the highest `metric` and a logged model."""
    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        raise RegistryError(f"experiment {experiment!r} does not exist at "
                            f"{mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], output_format="list",
                              filter_string="attributes.status = 'FINISHED'",
                              order_by=[f"metrics.`{metric}` DESC"], max_results=1000)
    this_run = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e register` has its own run
    candidates = [r for r in runs if metric in r.data.metrics and r.info.run_id != this_run]
    if not candidates:
        raise RegistryError(f"experiment {experiment!r} has no finished run with metric "
                            f"{metric}")
    return max(candidates, key=lambda r: r.data.metrics[metric])


def register_run(run_id: str, name: str = DEFAULT_NAME, force: bool = False) -> Registration:
    """New version of `name` from the run's `model`; challenger always, champion if better."""
    client = MlflowClient()
    run = _get_run(client, run_id)
    score = run.data.metrics.get(DEFAULT_METRIC)
    if score is None:
        raise RegistryError(f"run {run_id} has no {DEFAULT_METRIC}: it did not finish training")
    if not run.outputs.model_outputs:
        raise RegistryError(f"run {run_id} has no logged model to register")
    version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=_version_tags(run))
    client.update_model_version(name, version.version, description=_description(run, score))
    _attach_model_card(client, run, name, version.version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    promote, reason = _decide(client, name, score, force)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    registration = Registration(name, version.version, run_id, score, promote, reason)
    log.info("%s", registration.summary())
    return registration


def _decide(client: MlflowClient, name: str, score: float, force: bool) -> tuple[bool, str]:
    current = champion(client, name)
    if current is None:
        return True, "there was no champion yet"
    best = float(current.tags.get(DEFAULT_METRIC, "nan"))
    if force:
        return True, f"--force replaced champion version {current.version} ({best:.4f})"
    if score > best:
        return True, f"better than champion version {current.version} ({best:.4f})"
    return False, (f"champion stays version {current.version} ({best:.4f}): "
                   f"{score:.4f} is not higher")


def champion(client: MlflowClient, name: str):
    """The version aliased `champion`, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _attach_model_card(client: MlflowClient, run: Run, name: str, version: str) -> None:
    """model_card.md into the registered model's own artifacts (and a tag pointing at it)."""
    card = model_card.render(name, version, run.info.run_id, run.info.run_name,
                             run.data.params, run.data.metrics,
                             tracking.run_table(run.info.run_id, "subgroups.csv"),
                             _split_counts(run.info.run_id))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_card.md"
        path.write_text(card)
        client.log_model_artifact(run.outputs.model_outputs[0].model_id, str(path))
    client.set_model_version_tag(name, version, "model_card", "model_card.md")


def _split_counts(run_id: str) -> pd.DataFrame | None:
    split = tracking.run_table(run_id, "split.csv")
    if split is None:
        return None
    counts = pd.crosstab(split["dx"], split["split"]).reindex(columns=["train", "val", "test"],
                                                              fill_value=0)
    counts.loc["total"] = counts.sum()
    return counts


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
        raise RegistryError(f"cannot find the run behind model {model_uri}") from None


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"run {run_id} does not exist at {mlflow.get_tracking_uri()}") \
            from None


def _version_tags(run: Run) -> dict[str, str]:
    metrics, tags = run.data.metrics, run.data.tags
    digests = ",".join(f"{i.dataset.name}:{i.dataset.digest}"
                       for i in sorted(run.inputs.dataset_inputs, key=lambda i: i.dataset.name))
    values = {
        "run_id": run.info.run_id,
        DEFAULT_METRIC: metrics.get(DEFAULT_METRIC),
        "val_balanced_accuracy": metrics.get("best_val_balanced_accuracy"),
        "test_auc": metrics.get("test_auc"),
        "dataset_digest": digests or None,
        "git_commit": tags.get("mlflow.source.git.commit"),
        "arch": run.data.params.get("model.arch"),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def _description(run: Run, score: float) -> str:
    params = run.data.params
    return (f"{params.get('model.arch', 'ResNeXt')} at {params.get('model.image_size', '?')} px, "
            f"balance {params.get('balance.strategy', '?')}, trained in run {run.info.run_id} "
            f"({run.info.run_name}); lesion-grouped test split balanced accuracy {score:.4f}.")
