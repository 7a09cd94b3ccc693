"""How skinml's experiments look in the MLflow UI: the Model training view, a description of
what each experiment holds, the role tag every run carries, and why a run that `mlflow run`
launched failed before skinml started it (light: the CLI imports it on a refused option)."""

from __future__ import annotations

import logging
import os

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI opens it in Model training view
# Evaluations and comparisons judge models; they get their own experiment next to the one
# that trains, so its runs list holds training runs and studies only.
EVALUATIONS = "{experiment}-evaluations"
NOTE_TAG = "mlflow.note.content"  # the experiment's description in the MLflow UI
TRAINING_NOTE = """Training runs (tag `skinml.role=training`) and tuning studies (`study`,
trials nested under them). Evaluations and comparisons are in the experiment
`{experiment}-evaluations`.

To compare runs: filter `tags.skinml.role = "training"`, add the columns
`best_val_balanced_accuracy` (what selection reads), `test_balanced_accuracy` with
`test_balanced_accuracy_ci_low`/`_high` (reported, never used to choose), `test_auc`,
`balance.strategy`, `model.arch`, `model.image_size`; select two or more runs and press
Compare for `val_balanced_accuracy` per epoch. Each run's artifacts hold its confusion
matrices, classification report, ROC/PR curves and reliability diagram."""
EVALUATIONS_NOTE = """`skinml evaluate` runs (tag `skinml.role=evaluation`, the model in
`skinml.model_uri`, its training run in `skinml.source_run_id`) and `skinml compare` runs
(`comparison`) for the models trained in `{experiment}`."""
ROLE_TAG = "skinml.role"  # training, study, evaluation or comparison: what a run is for


def describe_experiment(experiment_id: str, role: str) -> None:
    """The UI's view of the experiment, and a description saying what is in it (once)."""
    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if NOTE_TAG not in experiment.tags:
        judging = role in ("evaluation", "comparison")
        note = EVALUATIONS_NOTE if judging else TRAINING_NOTE
        trained_in = experiment.name.removesuffix(EVALUATIONS.format(experiment=""))
        client.set_experiment_tag(experiment_id, NOTE_TAG, note.format(experiment=trained_in))


def tag_launching_run_error(message: str) -> None:
    """Under `mlflow run` the run exists before skinml reads its parameters: MLflow marks it
    FAILED; the tag `skinml.error` says why, in the UI. Nothing to do outside `mlflow run`."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        MlflowClient().set_tag(run_id, "skinml.error", message[:5000])
    except Exception:  # the error line follows regardless; the tag is a courtesy
        log.debug("could not tag run %s", run_id, exc_info=True)
