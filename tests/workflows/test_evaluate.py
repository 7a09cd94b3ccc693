"""`skinml evaluate`: the registered champion judged exactly as served, on its run's own test
split, on a labelled folder, and on ISIC 2018 Task 3 images against the official scorer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from skinml.data.synth import write_synthetic

from ..conftest import ISIC_SCORER, NAME


@pytest.mark.slow
def test_evaluate_reproduces_the_training_runs_test_metrics(demo):
    result = demo.cli_in_process("evaluate", f"models:/{NAME}@champion", "--bootstrap", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balanced accuracy (ISIC 2018 metric)" in result.stdout
    run_id = result.stdout.split("evaluation run ")[1].split()[0]
    client = mlflow.MlflowClient(demo.uri)
    run = client.get_run(run_id)
    assert run.data.tags["skinml.role"] == "evaluation"
    # Evaluations live beside the training experiment, each with a description for the UI.
    judged = client.get_experiment(run.info.experiment_id)
    trained = client.get_experiment_by_name("skin-lesion")
    assert judged.name == "skin-lesion-evaluations"
    assert "skinml evaluate" in judged.tags["mlflow.note.content"]
    assert "best_val_balanced_accuracy" in trained.tags["mlflow.note.content"]
    assert not client.search_runs([trained.experiment_id],
                                  "tags.`skinml.role` = 'evaluation'")
    assert run.data.tags["skinml.model_uri"] == f"models:/{NAME}@champion"
    trained = client.get_run(run.data.tags["skinml.source_run_id"]).data.metrics
    # the served model on the run's own test split gives the run's test numbers
    for key in ("test_balanced_accuracy", "test_auc", "test_ece", "test_temperature"):
        assert run.data.metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    m = run.data.metrics
    assert m["test_balanced_accuracy_ci_low"] <= m["test_balanced_accuracy"] <= \
        m["test_balanced_accuracy_ci_high"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"evaluation_report.md", "gradcam_grid.png", "reliability_diagram.png",
            "subgroups.csv", "subgroups.png", "confusion_matrix.png", "predictions.csv",
            "classification_report.txt"} <= artifacts
    report = Path(client.download_artifacts(run_id, "evaluation_report.md")).read_text()
    assert "## Subgroups" in report and "lesion" in report


@pytest.mark.slow
def test_evaluate_on_the_training_folder_warns_that_it_is_not_a_test_score(demo):
    result = demo.cli_in_process("evaluate", f"models:/{NAME}@champion", "--split", "all",
                                 "--data-dir", str(demo.folder), "--bootstrap", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = demo.ranked[0].run_id
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"are in the train/val split of run {run_id}" in warnings[0]
    assert "not a test score" in warnings[0]


@pytest.fixture(scope="module")
def isic_folder(tmp_path_factory) -> tuple[Path, Path]:
    """ISIC 2018 Task 3 layout: a folder of JPEGs and the one-hot ground truth CSV."""
    synthetic = write_synthetic(tmp_path_factory.mktemp("isic") / "synth", 42, seed=4,
                                width=64, height=48, progress=False)
    metadata = pd.read_csv(synthetic / "HAM10000_metadata.csv")
    images = synthetic.parent / "ISIC2018_Task3_Test_Input"
    images.mkdir()
    for image_id in metadata["image_id"]:
        (synthetic / f"{image_id}.jpg").rename(images / f"{image_id}.jpg")
    truth = pd.DataFrame({"image": metadata["image_id"],
                          **{c: (metadata["dx"] == c.lower()).astype(float)
                             for c in ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    truth_csv = synthetic.parent / "ISIC2018_Task3_Test_GroundTruth.csv"
    truth.to_csv(truth_csv, index=False)
    return images, truth_csv


@pytest.mark.slow
def test_evaluate_on_an_isic_2018_folder_agrees_with_the_official_scorer(demo, isic_folder,
                                                                         tmp_path):
    images, truth_csv = isic_folder
    result = demo.cli_in_process("evaluate", f"models:/{NAME}@champion", "--split", "isic",
                                 "--data-dir", str(images), "--truth", str(truth_csv),
                                 "--bootstrap", "20", "--tta")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("evaluation run ")[1].split()[0]
    client = mlflow.MlflowClient(demo.uri)
    run = client.get_run(run_id)
    assert run.data.params["eval.tta"] == "True"
    ours = run.data.metrics["isic_balanced_accuracy"]
    predictions = pd.read_csv(client.download_artifacts(run_id, "predictions.csv"))
    submission = pd.DataFrame({"image": predictions["image_id"],
                               **{c: predictions[f"p_{c.lower()}"] for c in
                                  ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    submission.to_csv(tmp_path / "submission.csv", index=False)
    scored = subprocess.run([sys.executable, "-c", ISIC_SCORER, "-o", "json", "classification",
                             str(truth_csv), str(tmp_path / "submission.csv")],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr
    official = json.loads(scored.stdout)["aggregate"]["balanced_accuracy"]
    assert ours == pytest.approx(official, abs=1e-9)


def test_evaluate_refuses_a_bad_ground_truth_file(demo, isic_folder, tmp_path):
    images, truth_csv = isic_folder
    bad = tmp_path / "truth.csv"
    pd.read_csv(truth_csv).drop(columns="VASC").to_csv(bad, index=False)
    result = demo.cli_in_process("evaluate", f"models:/{NAME}@champion", "--split", "isic",
                                 "--data-dir", str(images), "--truth", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}: missing column(s) VASC"
