"""Writing runs: every run skinml starts has its role, provenance and experiment kind, and a
scored split logs exactly the figures and tables reports decides."""

from __future__ import annotations

import mlflow
import numpy as np

from skinml.evaluation import reports
from skinml.evaluation.scoring import score_split
from skinml.tracking.experiments import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from skinml.tracking.writer import comparison_run, evaluation_run, study_run

RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(7), 6)
PROBS = RNG.dirichlet(np.ones(7), len(LABELS))


def test_each_kind_of_run_carries_its_role_and_the_experiment_kind(tracking):
    with evaluation_run("judged", "models:/m/1", "test", {"tta": False, "data_dir": None},
                        "abc123") as evaluation:
        pass
    with comparison_run("judged", "models:/m/1", "models:/m/2", {"rounds": 10}) as pair:
        pass
    with study_run("judged", "a-study", "sqlite:///x.db", {"n_trials": 3}) as study:
        pass
    client = mlflow.MlflowClient()
    roles = {run_id: client.get_run(run_id).data.tags for run_id in
             (evaluation.run_id, pair.run_id, study)}
    assert [tags["skinml.role"] for tags in roles.values()] == ["evaluation", "comparison",
                                                                  "study"]
    assert roles[evaluation.run_id]["skinml.source_run_id"] == "abc123"
    assert client.get_run(evaluation.run_id).data.params == {"eval.tta": "False",
                                                             "eval.data_dir": ""}
    assert roles[pair.run_id]["skinml.model_uri_b"] == "models:/m/2"
    assert all("mlflow.source.git.commit" in tags for tags in roles.values())
    experiment = client.get_experiment_by_name("judged")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_run(study).data.params["tune.n_trials"] == "3"


def test_a_scored_split_logs_metrics_and_exactly_the_artifacts_reports_names(tracking):
    scored = score_split("test", LABELS, PROBS, 1.5, groups=np.arange(len(LABELS)), n_boot=20)
    with comparison_run("scores", "a", "b", {}) as run:
        returned = run.log_scored_split(scored)
    assert returned == scored.scores
    logged = mlflow.get_run(run.run_id).data.metrics
    assert logged["test_balanced_accuracy"] == scored.scores["balanced_accuracy"]
    assert logged["test_temperature"] == 1.5 and "test_recall_mel" in logged
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)}
    expected = set(reports.split_figures(scored, "t")) | set(reports.split_tables(scored))
    assert artifacts == expected
