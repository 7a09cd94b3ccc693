"""`skinml compare`: two models on the same images, paired bootstrap, logged as a run."""

from __future__ import annotations

import logging

import mlflow
import pandas as pd
import pytest

from skinml.core.labels import CLASSES
from skinml.workflows.compare import CompareOptions, compare, compare_models, shared_split

from ..conftest import isolated_tracking, trained_store

# Every test here compares the models the `models` fixture trains (three runs, 8-14 s on 2
# cores, over 10 s in a whole-suite run).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two seeds on one split of a small folder, and a third model on another split."""
    runs = [["optim.epochs=1", "runtime.seed=0"], ["optim.epochs=1", "runtime.seed=1"],
            ["optim.epochs=1", "data.split_seed=1"]]
    with trained_store(tmp_path_factory.mktemp("compare"), runs, lesions_per_class=6) as store:
        yield store


def comparison_run_id(stdout: str) -> str:
    return stdout.split("comparison run ")[1].split()[0]


def test_compare_prints_both_scores_the_paired_delta_and_logs_a_run_with_a_figure(models):
    a, b = models.runs[0], models.runs[1]
    result = models.cli_in_process("compare", a.model_uri, b.model_uri, "--bootstrap", "500")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"A  {a.model_uri}: balanced accuracy " in out and "95 % CI" in out
    assert f"B  {b.model_uri}: balanced accuracy " in out
    assert "Δ = A - B: " in out and "paired lesion bootstrap, 500 rounds" in out
    assert "test split shared by runs" in out
    for dx in CLASSES:
        assert any(line.startswith(dx) for line in out.splitlines()), dx

    client = mlflow.MlflowClient(models.uri)
    run = client.get_run(comparison_run_id(out))
    assert run.data.tags["skinml.role"] == "comparison"
    assert run.data.tags["skinml.model_uri_a"] == a.model_uri
    m = run.data.metrics
    assert m["delta_balanced_accuracy"] == pytest.approx(
        m["a_balanced_accuracy"] - m["b_balanced_accuracy"])
    assert m["delta_balanced_accuracy_ci_low"] <= m["delta_balanced_accuracy"] <= \
        m["delta_balanced_accuracy_ci_high"]
    # Both scored on the run's own test split: the same number training logged for A.
    assert m["a_balanced_accuracy"] == pytest.approx(a.test["balanced_accuracy"])
    assert len(run.data.params["compare.set_digest"]) == 64
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"comparison.png", "comparison.md", "per_class_recall.csv"} <= artifacts
    with isolated_tracking(models.root):
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_class_recall.csv"))
    assert table["class"].tolist() == list(CLASSES)


def test_a_model_compared_with_itself_differs_by_exactly_zero(models):
    uri = models.runs[0].model_uri
    with isolated_tracking(models.root):
        image_set = shared_split(models.runs[0].run_id, models.runs[0].run_id)
        result = compare_models(uri, uri, image_set, rounds=200).result
    assert (result.delta.value, result.delta.low, result.delta.high) == (0.0, 0.0, 0.0)
    assert result.a == result.b


def test_models_split_differently_are_compared_only_on_a_named_folder(models, caplog):
    a, other = models.runs[0], models.runs[2]
    refused = models.cli_in_process("compare", a.model_uri, other.model_uri)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: runs {a.run_id} and {other.run_id} were not trained on "
                           "the same split")
    assert last.endswith("--split all --data-dir DIR") and "Traceback" not in refused.stderr

    with isolated_tracking(models.root):
        comparison, run_id = compare(CompareOptions(a.model_uri, other.model_uri, split="all",
                                                    data_dir=str(models.folder), rounds=200))
    images = len(pd.read_csv(models.folder / "HAM10000_metadata.csv"))
    assert comparison.result.images == images
    assert comparison.image_set.description == f"all of {models.folder}"
    # both trained on some of these images: one warning for each, naming its run
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "skinml.workflows.compare"]
    assert len(warnings) == 2
    assert a.run_id in warnings[0] and other.run_id in warnings[1]
    assert mlflow.MlflowClient(models.uri).get_run(run_id).data.params[
        "compare.split"] == "all"


MISSING_RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("missing_first", [True, False])
def test_a_run_that_does_not_exist_is_one_line(models, missing_first):
    missing = f"runs:/{MISSING_RUN}/model"
    pair = (missing, models.runs[0].model_uri)
    result = models.cli_in_process("compare", *(pair if missing_first else pair[::-1]))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: run {MISSING_RUN} does not exist (read "
                                     f"{models.uri})")


def test_a_run_without_a_model_is_said_to_have_none(models):
    with isolated_tracking(models.root), mlflow.start_run() as run:  # no model logged
        mlflow.set_tag("skinml.role", "evaluation")
    result = models.cli_in_process("compare", models.runs[0].model_uri,
                                   f"runs:/{run.info.run_id}/model")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: no model at runs:/{run.info.run_id}/model: run {run.info.run_id} (role: "
        f"evaluation) has none at 'model' (read {models.uri})")
