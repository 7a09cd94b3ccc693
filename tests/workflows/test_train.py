"""Training end to end: real MLflow (SQLite in tmp), the small ResNeXt, 32 px images, 1-3 epochs."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import ExecutionException

from skinml.core.config import load_config
from skinml.core.labels import CLASSES
from skinml.data import SplitError
from skinml.data.cache import cache_root
from skinml.tracking.reader import logged_models_of, model_uri_of
from skinml.training.checkpoint import Checkpoint
from skinml.workflows import prepared
from skinml.workflows.train import train

from ..conftest import (
    DEMO,
    REPO,
    cuda_test,
    image_frame,
    refused_statements,
    skinml_in_process,
    tiny,
    user_run_state,
)

ARTIFACTS = {"config.yaml", "split.csv", "confusion_matrix.png", "confusion_matrix_normalized.png",
             "classification_report.txt", "classification_report.json", "roc_curves.png",
             "pr_curves.png", "per_class_metrics.csv", "reliability_diagram.png",
             "subgroups.csv", "subgroups.png"}
EPOCH_METRICS = ["train_loss", "val_loss", "val_balanced_accuracy", "val_accuracy",
                 "val_macro_f1", "val_auc", "lr", "epoch_seconds", "train_images_per_second"]


@pytest.fixture
def small_folder(make_folder) -> Path:
    return make_folder("small", lesions_per_class=5)


def image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def metric_steps(run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_train_logs_a_complete_run(tracking, small_folder):
    with refused_statements() as refused:
        result = train(load_config(DEMO, tiny(small_folder)))
    assert refused == []
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "skin-lesion"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    assert {a.path for a in client.list_artifacts(result.run_id)} >= ARTIFACTS
    for key in EPOCH_METRICS:
        assert metric_steps(result.run_id, key) == [1, 2], key
    assert {"test_balanced_accuracy", "test_accuracy", "test_macro_f1", "test_auc",
            "test_average_precision", "test_ece", "test_ece_uncalibrated", "test_nll",
            "test_temperature"} <= set(run.data.metrics)
    m = run.data.metrics
    assert m["test_balanced_accuracy_ci_low"] <= m["test_balanced_accuracy"] <= \
        m["test_balanced_accuracy_ci_high"]
    # what selection reads carries its interval too
    assert m["best_val_balanced_accuracy_ci_low"] <= m["best_val_balanced_accuracy"] <= \
        m["best_val_balanced_accuracy_ci_high"]
    # The final metrics name the logged model (MLflow links them to it, logged once).
    logged = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    linked = {metric.key: metric.value for metric in logged.metrics}
    assert linked["test_balanced_accuracy"] == m["test_balanced_accuracy"]
    assert linked["best_val_balanced_accuracy"] == m["best_val_balanced_accuracy"]
    assert run.data.params["balance.strategy"] == "sampler"
    assert run.data.params["model.image_size"] == "32"
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == [
        "ham10000-test", "ham10000-train", "ham10000-val"]
    split = pd.read_csv(client.download_artifacts(result.run_id, "split.csv"))
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()
    subgroups = pd.read_csv(client.download_artifacts(result.run_id, "subgroups.csv"))
    for _, rows in subgroups.groupby("attribute"):
        assert rows["images"].sum() == len(split[split["split"] == "test"])

    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    images = sorted(small_folder.glob("*.jpg"))[:3]
    out = model.predict(pd.DataFrame({"image": [image_b64(p) for p in images]}))
    assert list(out.columns) == ["label", "diagnosis", "confidence",
                                 *[f"p_{c}" for c in CLASSES]]
    np.testing.assert_allclose(out[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert set(out["label"]) <= set(CLASSES)


def test_same_seed_gives_the_same_metrics(tracking, small_folder):
    overrides = tiny(small_folder, "augment.mixup_alpha=0.2", "optim.ema_decay=0.9")
    first = train(load_config(DEMO, overrides))
    second = train(load_config(DEMO, overrides))
    assert first.test == second.test
    client = mlflow.MlflowClient()
    history = [[m.value for m in client.get_metric_history(r.run_id, "val_loss")]
               for r in (first, second)]
    assert history[0] == history[1]


def test_training_refuses_a_leaking_split(tracking, small_folder, monkeypatch):
    def leaky(frame, **kwargs):
        split = pd.Series("train", index=frame.index)
        split.iloc[:3] = "test"  # the first lesion has several images: one goes to test
        return split

    monkeypatch.setattr(prepared, "split_by_lesion", leaky)
    with pytest.raises(SplitError, match="leak"):
        train(load_config(DEMO, tiny(small_folder)))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tracking, make_folder):
    folder = make_folder("resume", lesions_per_class=12)
    overrides = tiny(folder, "optim.epochs=4")
    command = [sys.executable, "-m", "skinml", "train", "--config", str(DEMO),
               *[f"--set={o}" for o in overrides]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = cache_root() / "checkpoints"
    deadline = time.monotonic() + 300
    epoch = 0
    while epoch < 1 and time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        for path in checkpoints.glob("*/last.pt"):
            epoch = torch.load(path, weights_only=True)["state"]["epoch"]
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (checkpoint,) = checkpoints.glob("*/last.pt")
    killed_at = torch.load(checkpoint, weights_only=True)["state"]["epoch"]
    assert 1 <= killed_at < 4
    run_id = checkpoint.parent.name
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # killed, not finished

    resumed = train(load_config(DEMO, tiny(folder)), resume_run_id=run_id)
    uninterrupted = train(load_config(DEMO, overrides))
    assert resumed.run_id == run_id
    assert resumed.test == uninterrupted.test
    assert resumed.best_epoch == uninterrupted.best_epoch
    client = mlflow.MlflowClient()
    by_step = [{m.step: m.value for m in client.get_metric_history(r, "val_balanced_accuracy")}
               for r in (run_id, uninterrupted.run_id)]
    assert by_step[0] == by_step[1] and sorted(by_step[0]) == [1, 2, 3, 4]
    assert mlflow.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_skinml_train_cli_runs_and_reports(tracking, small_folder):
    result = skinml_in_process("train", "--config", str(DEMO),
                               *[f"--set={o}" for o in tiny(small_folder, "optim.epochs=1")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("run ")
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert run.info.status == "FINISHED"
    again = skinml_in_process("train", "--resume", run.info.run_id)  # refused before any work
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: --resume {run.info.run_id}: the run finished; --resume continues a run that "
        "was killed or failed (start a new run instead)")
    assert mlflow.get_run(run.info.run_id).data.metrics == run.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize("entry, parameter, message", [
    ("main", "epochs=-1", "error: --epochs: optim.epochs must be at least 1, got -1"),
    # click's own usage errors (exit 2 too) say why on the run as well
    ("cv", "folds=1", "error: Invalid value for --folds: needs at least 2 folds"),
])
def test_mlflow_run_with_a_bad_parameter_says_why_in_one_line_and_on_the_run(
        tracking, capfd, entry, parameter, message):
    key, _, value = parameter.partition("=")
    with pytest.raises(ExecutionException):  # what `mlflow run` exits 1 on (`mlflow run`'s
        # own interpreter is left out: test_mlflow_run_trains_the_project runs the CLI)
        mlflow.run(str(REPO), entry, parameters={key: value}, experiment_name="skin-lesion",
                   env_manager="local")
    stderr = capfd.readouterr().err  # the entry point's process writes to this fd
    assert message in stderr.splitlines() and "Traceback" not in stderr
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["skinml.error"] == message.split(": ", 1)[1]


@pytest.mark.slow
def test_mlflow_run_trains_the_project(tracking, small_folder, tmp_path):
    before = user_run_state()
    overrides = " ".join(o for o in tiny(small_folder, "optim.epochs=1")
                         if not o.startswith(("data.dir", "model.arch")))
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name",
         "skin-lesion", "-P", f"data_dir={small_folder}", "-P", "arch=resnext_small",
         "-P", "epochs=1", "-P", f"overrides={overrides}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1"  # mlflow run's own param, left as it logged it
    assert run.data.params["optim.epochs"] == "1"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert names >= ARTIFACTS
    assert user_run_state() == before  # the user's own runs in the project are left alone


def test_early_stopping_ends_a_run_without_validation_gain(tracking, small_folder):
    # An EMA that barely leaves its starting weights scores the same every epoch.
    overrides = tiny(small_folder, "optim.epochs=5", "optim.ema_decay=0.99999",
                     "optim.early_stopping_patience=1")
    result = train(load_config(DEMO, overrides))
    assert result.best_epoch == 1
    assert metric_steps(result.run_id, "val_balanced_accuracy") == [1, 2]


def test_bf16_autocast_trains_on_the_cpu(tracking, small_folder):
    result = train(load_config(DEMO, tiny(small_folder, "runtime.amp=bf16", "optim.epochs=1")))
    assert np.isfinite(mlflow.get_run(result.run_id).data.metrics["train_loss"])


@cuda_test
def test_one_cuda_epoch_and_the_cuda_pyfunc_equals_the_cpu_one(tracking, make_folder):
    folder = make_folder("small", lesions_per_class=5)
    result = train(load_config(DEMO, tiny(folder, "runtime.device=cuda", "runtime.amp=bf16",
                                          "optim.epochs=1", "optim.ema_decay=0.9")))
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    images = sorted(folder.glob("*.jpg"))[:16]
    frame = image_frame(images)
    model = mlflow.pyfunc.load_model(result.model_uri)
    python_model = model.unwrap_python_model()
    assert python_model.device.type == "cuda"
    on_cuda = model.predict(frame)
    on_cpu = python_model.to("cpu").predict(None, frame)
    columns = [c for c in on_cuda.columns if c.startswith("p_")]
    assert np.abs(on_cuda[columns].to_numpy() - on_cpu[columns].to_numpy()).max() < 1e-3


KILL_IN_MODEL_LOGGING = """
import os, signal, sys
from mlflow.tracking import MlflowClient
from skinml.cli import main

upload = MlflowClient.log_model_artifacts
def killed(self, model_id, local_dir):
    upload(self, model_id, local_dir)  # the model's files are there; it never finishes
    os.kill(os.getpid(), signal.SIGKILL)
MlflowClient.log_model_artifacts = killed
main(sys.argv[1:])
"""


def _one_live_model(run_id: str) -> str:
    """The run holds exactly one logged model, READY and loadable; its URI."""
    run = mlflow.get_run(run_id)
    (model,) = logged_models_of(run_id, run.info.experiment_id)
    assert model.status.name == "READY"
    assert model_uri_of(run) == f"models:/{model.model_id}"
    mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    return model.model_id


@pytest.mark.slow
def test_a_run_killed_inside_model_logging_resumes_with_one_model(tracking, small_folder):
    overrides = tiny(small_folder, "optim.epochs=1")
    killed = subprocess.run([sys.executable, "-c", KILL_IN_MODEL_LOGGING, "train",
                             "--config", str(DEMO), *[f"--set={o}" for o in overrides]],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert run.info.status == "RUNNING"  # SIGKILL: nobody ended it
    (orphan,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            output_format="list")

    resumed = train(load_config(DEMO, overrides), resume_run_id=run.info.run_id)
    live = _one_live_model(run.info.run_id)
    assert live != orphan.model_id and resumed.model_uri == f"models:/{live}"
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_an_interrupt_after_the_model_was_logged_resumes_with_one_model(tracking, small_folder):
    overrides = tiny(small_folder, "optim.epochs=1")
    upload = mlflow.MlflowClient.log_model_artifacts

    def interrupted(self, model_id, local_dir):
        upload(self, model_id, local_dir)
        raise KeyboardInterrupt  # Ctrl-C as the upload returns

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt) as stopped:
        patch.setattr(mlflow.MlflowClient, "log_model_artifacts", interrupted)
        train(load_config(DEMO, overrides))
    run_id = stopped.value.run_id  # the CLI prints the resume command from it
    assert mlflow.get_run(run_id).info.status == "KILLED"
    checkpoint = cache_root() / "checkpoints" / run_id / "last.pt"
    assert checkpoint.is_file()  # kept for --resume

    train(load_config(DEMO, overrides), resume_run_id=run_id)
    _one_live_model(run_id)
    assert not checkpoint.exists() and not checkpoint.parent.exists()  # finished: freed


@pytest.mark.slow
def test_keep_checkpoint_keeps_a_finished_runs_checkpoint(tracking, small_folder):
    result = train(load_config(DEMO, tiny(small_folder, "optim.epochs=1",
                                          "runtime.keep_checkpoint=true")))
    assert (cache_root() / "checkpoints" / result.run_id / "last.pt").is_file()


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(
        tracking, small_folder):
    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C as the first checkpoint would be written

    config = load_config(DEMO, tiny(small_folder, "optim.epochs=1"))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt) as stopped:
        patch.setattr(Checkpoint, "save", interrupted)
        train(config)
    run_id = stopped.value.run_id
    assert not (cache_root() / "checkpoints" / run_id).exists()
    resumed = train(load_config(DEMO, []), resume_run_id=run_id)  # config from config.yaml
    assert resumed.run_id == run_id and resumed.best_epoch == 1
    assert mlflow.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_run_whose_checkpoint_was_removed_is_not_restarted_silently(tracking, small_folder):
    save = Checkpoint.save

    def interrupted_after_epoch_2(self, model, tools, state):
        save(self, model, tools, state)
        if state.epoch == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt) as stopped:
        patch.setattr(Checkpoint, "save", interrupted_after_epoch_2)
        train(load_config(DEMO, tiny(small_folder, "optim.epochs=3")))
    run_id = stopped.value.run_id
    checkpoint = cache_root() / "checkpoints" / run_id / "last.pt"
    checkpoint.unlink()  # e.g. `skinml cache prune --checkpoints`
    result = skinml_in_process("train", "--resume", run_id)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --resume {run_id}: its checkpoint {checkpoint} is gone after 2 epochs "
        "(removed by `skinml cache prune`?): start a new run instead")
    assert mlflow.get_run(run_id).info.status == "KILLED"
