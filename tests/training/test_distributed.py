"""DDP on CPU: 2 gloo processes under torchrun, one MLflow run, metrics over the full split."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from skinml.core.config import build_config
from skinml.data.cache import cache_root
from skinml.data.preprocess import EvalTransform
from skinml.evaluation.metrics import compute_metrics
from skinml.models import build_model
from skinml.training.distributed import Cluster, shard
from skinml.training.engine import predict_split
from skinml.workflows.prepared import batches_for, prepare_data

from ..conftest import DEMO, tiny


def test_shards_are_disjoint_equal_and_cover_the_order():
    order = np.random.default_rng(0).permutation(103)
    shards = [shard(order, Cluster(rank, 4)) for rank in range(4)]
    assert {len(s) for s in shards} == {25}
    joined = np.concatenate(shards)
    assert len(set(joined)) == 100 and set(joined) <= set(order[:100])


def torchrun(folder: Path, *extra: str, resume: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "skinml", "train", "--nproc", "2", "--config", str(DEMO),
            *[f"--set={o}" for o in tiny(folder, *extra)]]
    if resume:
        args += ["--resume", resume]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    stack, doomed = [pid], []
    while stack:
        doomed.append(stack.pop())
        stack += children.get(doomed[-1], [])
    for victim in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_two_process_run_logs_once_with_full_split_metrics(tracking, make_folder):
    folder = make_folder("ddp", lesions_per_class=6)
    finish(torchrun(folder, "runtime.keep_checkpoint=true"))  # its weights are checked below
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_balanced_accuracy")
    assert [m.step for m in history] == [1, 2]
    # Recompute epoch 2's val metrics in one process, on the whole val split.
    payload = torch.load(cache_root() / "checkpoints" / run.info.run_id / "last.pt",
                         weights_only=True)
    config = build_config(payload["config"])
    model = build_model(config.model)
    model.load_state_dict(payload["model"])
    val = batches_for(prepare_data(config), "val", 64, torch.device("cpu"))
    output = predict_split(model, val, EvalTransform(config.model.image_size,
                                                     config.model.crop_pct))
    assert len(output.labels) == len(val)
    scores = compute_metrics(output.labels, output.probs)
    assert history[-1].value == pytest.approx(scores["balanced_accuracy"], abs=1e-9)
    assert run.data.metrics["val_loss"] == pytest.approx(output.loss, rel=1e-5)
    assert run.data.metrics["val_auc"] == pytest.approx(scores["auc"], abs=1e-6)


@pytest.mark.slow
def test_ddp_resume_ends_like_an_uninterrupted_ddp_run(tracking, make_folder):
    folder = make_folder("ddp", lesions_per_class=25)  # epochs of ~1 s: time to kill in
    process = torchrun(folder, "optim.epochs=4")
    checkpoints = cache_root() / "checkpoints"
    deadline, epoch = time.monotonic() + 300, 0
    while epoch < 1 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        for path in checkpoints.glob("*/last.pt"):
            epoch = torch.load(path, weights_only=True)["state"]["epoch"]
        time.sleep(0.05)
    kill_tree(process.pid)
    process.communicate()
    (checkpoint,) = checkpoints.glob("*/last.pt")
    run_id = checkpoint.parent.name
    assert torch.load(checkpoint, weights_only=True)["state"]["epoch"] < 4

    finish(torchrun(folder, resume=run_id))
    finish(torchrun(folder, "optim.epochs=4"))
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    other = next(r for r in runs if r.info.run_id != run_id)
    resumed = client.get_run(run_id)
    for key in ("test_balanced_accuracy", "test_auc", "best_epoch"):
        assert resumed.data.metrics[key] == other.data.metrics[key], key
    by_step = [{m.step: m.value for m in client.get_metric_history(r, "val_loss")}
               for r in (run_id, other.info.run_id)]
    assert by_step[0] == by_step[1] and sorted(by_step[0]) == [1, 2, 3, 4]
