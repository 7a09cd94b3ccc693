"""Model Registry: register a run's model; alias `challenger` always, `champion` only on a
paired win on the same images.

Aliases, not stages (deprecated in MLflow 3). Runs are picked by a validation metric; test
numbers are reported, never used to choose. The champion alias moves only when the
challenger beats the champion on the same labelled images: the lower end of the 95 %
paired lesion-bootstrap interval of Δ balanced accuracy (challenger - champion) must clear
`min_delta`. The champion is read again right before the alias moves, and one that moved
while the gate ran is judged again, so a racing registration cannot demote a better model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from skinml.core.errors import SkinmlError
from skinml.evaluation.metrics import Interval
from skinml.tracking import reader
from skinml.tracking.experiments import ROLE_TAG
from skinml.tracking.store import announce_store, store_hint
from skinml.tracking.writer import attach_model_file
from skinml.workflows import compare, model_card
from skinml.workflows.compare import ImageSet, ModelComparison

log = logging.getLogger(__name__)

DEFAULT_NAME = "skin-lesion-classifier"
DEFAULT_METRIC = "best_val_balanced_accuracy"  # the validation score of the epoch a run kept
CHAMPION, CHALLENGER = "champion", "challenger"
_LOWER_IS_BETTER = ("loss", "nll", "ece")
_NOT_MODELS = ("evaluation", "comparison", "study")  # runs of these roles never log a model
_JUDGE_ATTEMPTS = 5
_DECISION_TAG = "gate.decision"  # written last: a version without it was cut short


class RegistryError(SkinmlError):
    """A run, experiment or model version cannot be found or used."""


class NoSharedImages(RegistryError):
    """Challenger and champion share no test split and no gate folder was given."""


@dataclass(frozen=True)
class GateOptions:
    """How a challenger is judged against the champion before the alias may move."""

    gate_data: str | None = None  # a labelled folder; default: the runs' shared test split
    min_delta: float = 0.0
    force: bool = False
    rounds: int = compare.ROUNDS
    seed: int = 0


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    score: float  # DEFAULT_METRIC of the run: what selection reads
    champion: bool
    reason: str
    gate: ModelComparison | None

    def summary(self) -> str:
        aliases = f"{CHALLENGER}, {CHAMPION}" if self.champion else CHALLENGER
        return (f"registered {self.name} version {self.version} from run {self.run_id} "
                f"({DEFAULT_METRIC} {self.score:.4f}): aliases {aliases}; {self.reason}")


def best_run(experiment: str, metric: str = DEFAULT_METRIC) -> Run:
    """The finished training run of `experiment` with the best validation `metric`."""
    if metric.startswith("test_") or "_test_" in metric:
        raise RegistryError(f"--metric {metric} is a test metric: the test split is reported, "
                            f"never used to choose; pick by validation, e.g. {DEFAULT_METRIC}")
    found = reader.experiment_id(experiment)
    if found is None:
        raise RegistryError(f"experiment {experiment!r} does not exist{store_hint()}")
    lower = any(word in metric for word in _LOWER_IS_BETTER)
    runs = reader.finished_runs(found, f"metrics.`{metric}` {'ASC' if lower else 'DESC'}")
    this_run = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e register` has its own run
    candidates = [r for r in runs if metric in r.data.metrics and r.info.run_id != this_run
                  and r.data.tags.get(ROLE_TAG) not in _NOT_MODELS
                  and r.outputs is not None and r.outputs.model_outputs]
    if not candidates:
        raise RegistryError(f"experiment {experiment!r} has no finished training run with a "
                            f"logged model and metric {metric}")
    pick = min if lower else max
    return pick(candidates, key=lambda r: r.data.metrics[metric])


def register_run(run_id: str, name: str = DEFAULT_NAME, gate: GateOptions | None = None,
                 version: str | None = None) -> Registration:
    """New version of `name` from the run's `model`: challenger always, champion on a win.

    The gate runs before anything is written, so a gate that cannot run (different splits
    and no gate folder) leaves the registry as it was. `version`: one this run already
    registered in a call that stopped before its gate was recorded (see `gated`); it is
    judged and recorded instead of registering another.
    """
    announce_store()  # the registry it writes to, named once
    options = gate or GateOptions()
    client = MlflowClient()
    run = _registrable_run(run_id)
    compared = champion(client, name)
    if version is not None and _version(compared) == version:
        return _finish_promoted(client, run, name, version, options)
    judged, note = _judge(run, compared, name, options)
    model_uri = reader.model_uri_of(run)
    if version is None:
        registered = mlflow.register_model(model_uri, name,
                                           tags=_selection_tag(_provenance(run)))
        version = str(registered.version)
    client.update_model_version(name, version, description=_description(run))
    client.set_registered_model_alias(name, CHALLENGER, version)
    compared, judged, note = _judged_against_current(client, name, run, compared, judged,
                                                     note, options)
    decision, reason = _decide(compared, judged, note, options)
    return _record(client, run, model_uri, (name, version),
                   (decision, reason, compared, judged), options)


def gated(name: str, version: str) -> bool:
    """Whether the gate's decision on a version was recorded (the last step of registering)."""
    return _DECISION_TAG in MlflowClient().get_model_version(name, version).tags


def _finish_promoted(client: MlflowClient, run: Run, name: str, version: str,
                     options: GateOptions) -> Registration:
    """A version made champion by a call that stopped before recording why: the judgement
    is gone (the champion it beat no longer holds the alias), and the record says so."""
    reason = "made champion before a restart; the gate's comparison was not recorded"
    client.set_registered_model_alias(name, CHALLENGER, version)  # set before champion was
    return _record(client, run, reader.model_uri_of(run), (name, version),
                   ("promoted", reason, None, None), options)


def _record(client: MlflowClient, run: Run, model_uri: str, registered: tuple[str, str],
            gate: tuple[str, str, ModelVersion | None, ModelComparison | None],
            options: GateOptions) -> Registration:
    """Move `champion` on a promotion, then write the gate record, its tags and the card."""
    (name, version), (decision, reason, compared, judged) = registered, gate
    promoted = decision != "not promoted"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    record = {"gate": _gate_record(decision, reason, compared, judged, options),
              "provenance": _provenance(run)}
    model_id = model_uri.removeprefix("models:/")
    attach_model_file(model_id, model_card.record_file(version),
                      json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    _attach_model_card(run, name, version, model_id, record)
    for key, value in _gate_tags(record["gate"]).items():  # last: what `gated` reads
        client.set_model_version_tag(name, version, key, value)
    registration = Registration(name, version, run.info.run_id,
                                run.data.metrics[DEFAULT_METRIC], promoted, reason, judged)
    log.debug("%s", registration.summary())
    return registration


def _judged_against_current(client: MlflowClient, name: str, run: Run,
                            compared: ModelVersion | None, judged: ModelComparison | None,
                            note: str, options: GateOptions
                            ) -> tuple[ModelVersion | None, ModelComparison | None, str]:
    """Read the champion again; if another registration moved it while ours was judged,
    judge again against the new one, so a racing registration never demotes a better model
    (what is left is the moment between this read and moving the alias)."""
    for _ in range(_JUDGE_ATTEMPTS):
        now = champion(client, name)
        if _version(now) == _version(compared):
            return compared, judged, note
        log.info("champion moved to version %s during the gate; judging again", _version(now))
        compared = now
        judged, note = _judge(run, compared, name, options)
    raise RegistryError(f"the champion of {name} kept moving while run {run.info.run_id} was "
                        "judged; it stays challenger")


def _registrable_run(run_id: str) -> Run:
    try:
        run = reader.get_run(run_id)
    except SkinmlError as exc:
        raise RegistryError(str(exc)) from None
    if not reader.model_outputs(run):
        raise RegistryError(f"run {run_id} has no logged model to register")
    if DEFAULT_METRIC not in run.data.metrics:
        raise RegistryError(f"run {run_id} has no {DEFAULT_METRIC}: it did not finish training")
    return run


def _judge(run: Run, compared: ModelVersion | None, name: str, options: GateOptions
           ) -> tuple[ModelComparison | None, str]:
    """The challenger against the champion on the gate set (None when there is no champion,
    or when --force skips a gate that cannot run); the note says why there is none."""
    if compared is None:
        return None, "there was no champion yet"
    try:
        image_set = gate_set(run.info.run_id, compared, options.gate_data)
    except NoSharedImages as exc:
        if not options.force:
            raise
        return None, f"no gate ran: {exc}"
    judged = compare.compare_models(reader.model_uri_of(run),
                                    f"models:/{name}/{compared.version}", image_set,
                                    options.rounds, options.seed)
    return judged, ""


def gate_set(challenger_run: str, compared: ModelVersion, gate_data: str | None) -> ImageSet:
    """The images both models are judged on: `gate_data` (all of it) when given, else the
    test split both runs share; an error when they share none."""
    champion_run = compared.run_id
    if champion_run is None:  # a version registered from a path, not from a run
        raise RegistryError(f"champion version {compared.version} has no run behind it")
    runs = {"the challenger": challenger_run, f"champion version {compared.version}":
            champion_run}
    if gate_data is not None:
        return compare.folder_set(gate_data, runs)
    try:
        return compare.shared_split(challenger_run, champion_run, "test")
    except compare.NotSameSplit:
        raise NoSharedImages(f"run {challenger_run} and champion version {compared.version} "
                             f"(run {compared.run_id}) were not trained on the same split, so "
                             "their test splits hold different images: pass --gate-data DIR, "
                             "a labelled HAM10000 folder to judge both models on") from None


def _decide(compared: ModelVersion | None, judged: ModelComparison | None, note: str,
            options: GateOptions) -> tuple[str, str]:
    """(decision, one-line reason): first champion, promoted, forced or not promoted."""
    if compared is None:
        return "first champion", note
    champ = f"champion version {compared.version}"
    if judged is None:
        return "forced", f"--force replaced {champ}; {note}"
    won = judged.result.delta.low > options.min_delta
    rule = f"the 95 % CI of Δ must lie above {options.min_delta:+.3f}"
    if options.force:
        verdict = "the gate agrees" if won else f"the gate alone would keep it: {rule}"
        return "forced", f"--force replaced {champ} ({verdict}); {judged.line()}"
    if won:
        return "promoted", f"beats {champ}: {judged.line()}"
    return "not promoted", (f"{champ} stays, no evidence of improvement ({rule}): "
                            f"{judged.line()}")


def _gate_record(decision: str, reason: str, compared: ModelVersion | None,
                 judged: ModelComparison | None, options: GateOptions) -> dict[str, Any]:
    """The gate's full record (`gate` in `version_vN.json`; the model card renders it)."""
    record: dict[str, Any] = {
        "decision": decision, "reason": reason, "forced": options.force,
        "min_delta": options.min_delta,
        "champion": None if compared is None else {"version": _version(compared),
                                                   "run_id": compared.run_id},
        "comparison": None}  # None: no gate ran (no champion yet, or --force without one)
    if judged is not None:
        result, image_set = judged.result, judged.image_set
        record["comparison"] = {
            "balanced_accuracy": {"challenger": _interval(result.a),
                                  "champion": _interval(result.b),
                                  "delta": _interval(result.delta)},
            "set": {"description": image_set.description, "digest": image_set.digest,
                    "images": len(image_set.images), "lesions": image_set.lesions},
            "rounds": int(result.rounds), "seed": int(judged.seed)}
    return record


def _interval(interval: Interval) -> dict[str, float]:
    return {"value": float(interval.value), "ci_low": float(interval.low),
            "ci_high": float(interval.high)}


def _gate_tags(record: dict[str, Any]) -> dict[str, str]:
    """The gate tags a person scans in the Versions table (at most five); the rest of the
    record is in `version_vN.json`, beside the model card."""
    tags = {_DECISION_TAG: record["decision"], "gate.forced": str(record["forced"])}
    if record["champion"] is not None:
        tags["gate.champion_version"] = record["champion"]["version"]
    if record["comparison"] is not None:
        delta = record["comparison"]["balanced_accuracy"]["delta"]
        tags["gate.delta"] = (f"{delta['value']:+.3f} [{delta['ci_low']:+.3f}, "
                              f"{delta['ci_high']:+.3f}]")
        tags["gate.set_images"] = str(record["comparison"]["set"]["images"])
    return tags


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version aliased `champion`, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _version(version: ModelVersion | None) -> str | None:
    return None if version is None else str(version.version)


def _attach_model_card(run: Run, name: str, version: str, model_id: str,
                       record: dict[str, Any]) -> None:
    """The card into the logged model's artifacts, beside the version's record."""
    card = model_card.render(name, version, run.data.params, run.data.metrics,
                             reader.run_table(run.info.run_id, "subgroups.csv"),
                             _split_counts(run.info.run_id), record)
    attach_model_file(model_id, model_card.card_file(version), card)


def _split_counts(run_id: str) -> pd.DataFrame | None:
    split = reader.run_table(run_id, "split.csv")
    if split is None:
        return None
    counts = pd.crosstab(split["dx"], split["split"]).reindex(columns=["train", "val", "test"],
                                                              fill_value=0)
    counts.loc["total"] = counts.sum()
    return counts


def _provenance(run: Run) -> dict[str, Any]:
    """Where the version came from (`provenance` in `version_vN.json`); its test numbers
    are reported, never used to choose or compare."""
    metrics, params = run.data.metrics, run.data.params
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name,
        "arch": params.get("model.arch"), "split_seed": params.get("data.split_seed"),
        "git_commit": run.data.tags.get("mlflow.source.git.commit"),
        "datasets": {i.dataset.name: i.dataset.digest
                     for i in sorted(reader.dataset_inputs(run), key=lambda i: i.dataset.name)},
        "val_balanced_accuracy": _logged(metrics, DEFAULT_METRIC),  # what selection read
        "test_reported_only": {"balanced_accuracy": _logged(metrics, "test_balanced_accuracy"),
                               "auc": _logged(metrics, "test_auc")},
    }


def _logged(metrics: dict[str, float], key: str) -> dict[str, float] | None:
    """A run's metric with its 95 % CI when the run logged `<key>_ci_low/_high`."""
    if key not in metrics:
        return None
    logged = {"value": float(metrics[key])}
    if f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics:
        logged |= {"ci_low": float(metrics[f"{key}_ci_low"]),
                   "ci_high": float(metrics[f"{key}_ci_high"])}
    return logged


def _selection_tag(provenance: dict[str, Any]) -> dict[str, str]:
    """The selection metric as a version tag, with its interval when the run logged one."""
    score = provenance["val_balanced_accuracy"]
    shown = f"{score['value']:.3f}"
    if "ci_low" in score:
        shown += f" [{score['ci_low']:.2f}, {score['ci_high']:.2f}]"
    return {"val_balanced_accuracy": shown}


def _description(run: Run) -> str:
    params, metrics = run.data.params, run.data.metrics
    test = metrics.get("test_balanced_accuracy")
    reported = f"; test split balanced accuracy {test:.4f} (reported)" if test is not None else ""
    return (f"{params.get('model.arch', 'ResNeXt')} at {params.get('model.image_size', '?')} px, "
            f"balance {params.get('balance.strategy', '?')}, trained in run {run.info.run_id} "
            f"({run.info.run_name}); validation balanced accuracy "
            f"{metrics[DEFAULT_METRIC]:.4f}{reported}.")
