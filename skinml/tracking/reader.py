"""Reading runs back from MLflow: params, metrics, CSV artifacts, the split a run used, the
run behind a model URI, the runs a workflow looks for. `writer.py` writes runs; this module
only reads them."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import DatasetInput, LoggedModel, LoggedModelOutput, LoggedModelStatus, Run
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient

from skinml.core.errors import SkinmlError, first_line
from skinml.data.split import SPLITS
from skinml.tracking.experiments import ROLE_TAG
from skinml.tracking.store import store_hint


def resumable(run_id: str) -> None:
    """SkinmlError unless `run_id` is a run that stopped before finishing."""
    try:
        status = MlflowClient().get_run(run_id).info.status
    except MlflowException:
        raise SkinmlError(f"--resume {run_id}: no such run{store_hint()}") from None
    if status == "FINISHED":
        raise SkinmlError(f"--resume {run_id}: the run finished; --resume continues a run "
                          "that was killed or failed (start a new run instead)")


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


def dataset_inputs(run: Run) -> list[DatasetInput]:
    """The datasets `run` logged as inputs (none when it has no inputs at all)."""
    return run.inputs.dataset_inputs if run.inputs else []


def model_outputs(run: Run) -> list[LoggedModelOutput]:
    """The models `run` logged as outputs (none when it has no outputs at all)."""
    return run.outputs.model_outputs if run.outputs else []


def split_signature(run: Run) -> tuple[str, ...] | None:
    """What makes two runs' splits the same images: the digest of each logged split's data
    and the split seed. None when the run did not log them all (then nothing is assumed)."""
    digests = {i.dataset.name: i.dataset.digest for i in dataset_inputs(run)}
    seed = run.data.params.get("data.split_seed")
    names = [dataset_name(split) for split in SPLITS]
    if seed is None or any(name not in digests for name in names):
        return None
    return (*(f"{name}:{digests[name]}" for name in names), f"data.split_seed:{seed}")


def dataset_name(split: str) -> str:
    """The MLflow dataset a training run logs for one split (its digest identifies it)."""
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
            run_id = client.get_logged_model(target.split("/", 1)[0]).source_run_id
        elif "@" in target:
            model, alias = target.split("@", 1)
            run_id = client.get_model_version_by_alias(model, alias).run_id
        else:
            model, version = target.rsplit("/", 1)
            run_id = client.get_model_version(model, version).run_id
    except (MlflowException, ValueError):
        raise SkinmlError(f"cannot find the run behind model {model_uri}{store_hint()}") \
            from None
    if run_id is None:  # registered from a path, or logged outside any run
        raise SkinmlError(f"model {model_uri} has no training run behind it")
    return run_id


def logged_model_uri(run_id: str) -> str:
    """The model a run logged (MLflow 3 keeps it outside the run's artifacts)."""
    return model_uri_of(MlflowClient().get_run(run_id))


def model_uri_of(run: Run) -> str:
    """`models:/m-…` of the model `run` logged.

    A run logs one model that is READY; its outputs may also list one whose logging was
    interrupted (FAILED, or deleted by the resumed run): the READY one is the model.
    """
    outputs = model_outputs(run)
    if len(outputs) == 1 and _ready(outputs[0].model_id):
        return f"models:/{outputs[0].model_id}"
    live = _ready_models(run) if outputs else []
    if not live:
        raise SkinmlError(f"run {run.info.run_id} has no logged model")
    return f"models:/{live[0].model_id}"


def has_logged_model(run_id: str) -> bool:
    """Whether a run has a READY logged model (a tuning trial logs its model only if it is
    the best, and a logging that crashed leaves a FAILED one behind)."""
    run = MlflowClient().get_run(run_id)
    return bool(model_outputs(run)) and bool(_ready_models(run))


def _ready(model_id: str) -> bool:
    return MlflowClient().get_logged_model(model_id).status == LoggedModelStatus.READY


def _ready_models(run: Run) -> list[LoggedModel]:
    return [m for m in logged_models_of(run.info.run_id, run.info.experiment_id)
            if m.status == LoggedModelStatus.READY]


def versions_of_run(name: str, run_id: str) -> list[str]:
    """The versions of registered model `name` made from a run's model (oldest first)."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted((str(v.version) for v in found), key=int)


def logged_models_of(run_id: str, experiment: str) -> list[LoggedModel]:
    """The models a run logged that are not deleted (any status), newest first."""
    return mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        output_format="list")


def require_model(model_uri: str) -> None:
    """One line (SkinmlError) unless `model_uri` names a model: checked before anything is
    computed, so a missing run or model is not reported as something else."""
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        run = get_run(run_id)
        role = run.data.tags.get(ROLE_TAG)
        missing = f"no model at {model_uri}: run {run_id}{f' (role: {role})' if role else ''}" \
                  f" has none at {path or '/'!r}"
    else:
        missing = f"no model at {model_uri}"
    try:
        get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        detail = "" if model_uri.startswith("runs:/") else f": {first_line(exc)}"
        raise SkinmlError(f"{missing}{detail}{store_hint(model_uri)}") from None


def get_run(run_id: str) -> Run:
    """The run, or a one-line SkinmlError naming the store it is not in."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise SkinmlError(f"run {run_id} does not exist{store_hint()}") from None


def run_status(run_id: str) -> str | None:
    """RUNNING, FINISHED, FAILED or KILLED; None for a run this store does not hold."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def epochs_logged(run_id: str) -> int:
    """How many epochs a training run reported (the steps of its validation metric)."""
    history = MlflowClient().get_metric_history(run_id, "val_balanced_accuracy")
    return len({metric.step for metric in history})


def run_metrics(run_id: str) -> dict[str, float]:
    return MlflowClient().get_run(run_id).data.metrics


def artifact_names(run_id: str) -> set[str]:
    """The paths at the top of a run's artifacts."""
    return {item.path for item in MlflowClient().list_artifacts(run_id)}


def logged_config(run_id: str) -> dict[str, Any]:
    """The resolved config a run logged as config.yaml."""
    with open(download_run_artifact(run_id, "config.yaml")) as file:
        return yaml.safe_load(file)


def tagged_runs(experiment_id: str, tags: dict[str, str], finished: bool = False,
                max_results: int = 1000) -> list[Run]:
    """The runs of an experiment that carry every one of `tags` (FINISHED ones only if
    `finished`)."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if finished:
        clauses.append("attributes.status = 'FINISHED'")
    return MlflowClient().search_runs([experiment_id], " and ".join(clauses),
                                      max_results=max_results)


def experiment_id(name: str) -> str | None:
    found = MlflowClient().get_experiment_by_name(name)
    return None if found is None else found.experiment_id


def finished_runs(experiment_id: str, order_by: str) -> list[Run]:
    """The FINISHED runs of an experiment in `order_by` order (one MLflow ORDER BY clause)."""
    return mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                              filter_string="attributes.status = 'FINISHED'",
                              order_by=[order_by], max_results=1000)

