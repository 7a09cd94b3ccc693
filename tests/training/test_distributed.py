"""DDP on CPU: 2 gloo processes under torchrun, one MLflow run, metrics over the full split."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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

from ..conftest import DEMO, build_folder, isolated_tracking, tiny


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


@dataclass(frozen=True)
class ReferenceRun:
    """An uninterrupted two-process run in a store of its own, its checkpoint kept."""

    root: Path
    folder: Path
    cache: Path  # its SKINML_CACHE: the image cache and the kept checkpoint
    run_ids: list[str]  # every run in the store right after it ended


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """4 epochs of 2 gloo processes on a 25-lesions-per-class folder (epochs of ~1 s: time to
    kill a run in): what the full-split metrics are recomputed from, and what a killed and
    resumed run must end like. One run serves both tests (each torchrun costs ~25 s)."""
    root = tmp_path_factory.mktemp("ddp")
    folder = build_folder(root / "ham", lesions_per_class=25)
    with isolated_tracking(root), pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        finish(torchrun(folder, "optim.epochs=4", "runtime.keep_checkpoint=true"))
        runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    return ReferenceRun(root, folder, root / "cache", [r.info.run_id for r in runs])


@pytest.mark.slow
def test_two_process_run_logs_once_with_full_split_metrics(reference, monkeypatch):
    (run_id,) = reference.run_ids  # one MLflow run for the two processes
    monkeypatch.setenv("SKINML_CACHE", str(reference.cache))
    with isolated_tracking(reference.root):
        run = mlflow.get_run(run_id)
        history = mlflow.MlflowClient().get_metric_history(run_id, "val_balanced_accuracy")
    assert run.info.status == "FINISHED"
    assert [m.step for m in history] == [1, 2, 3, 4]
    # Recompute the last epoch's val metrics in one process, on the whole val split.
    payload = torch.load(cache_root() / "checkpoints" / run_id / "last.pt", weights_only=True)
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
def test_ddp_resume_ends_like_an_uninterrupted_ddp_run(reference):
    """Killed after its first epoch, resumed: it ends as the reference run (the same folder
    and settings, never interrupted; logged into the same store)."""
    with isolated_tracking(reference.root):
        process = torchrun(reference.folder, "optim.epochs=4")
        checkpoints = cache_root() / "checkpoints"  # this test's cache, not the reference's
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

        finish(torchrun(reference.folder, resume=run_id))
        client = mlflow.MlflowClient()
        runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        (other,) = [r for r in runs if r.info.run_id != run_id]
        assert other.info.run_id in reference.run_ids
        resumed = client.get_run(run_id)
        for key in ("test_balanced_accuracy", "test_auc", "best_epoch"):
            assert resumed.data.metrics[key] == other.data.metrics[key], key
        by_step = [{m.step: m.value for m in client.get_metric_history(r, "val_loss")}
                   for r in (run_id, other.info.run_id)]
    assert by_step[0] == by_step[1] and sorted(by_step[0]) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_when_rank_0_fails_preparing_data_every_rank_stops_with_its_reason(tmp_path):
    """Rank 0 builds the cache while the others wait: when it fails (here: no such folder),
    they stop with its one line instead of waiting or dying on a closed connection."""
    missing = tmp_path / "no-such-folder"
    done = subprocess.run([sys.executable, "-m", "skinml", "train", "--nproc", "2",
                           "--data-dir", str(missing)], capture_output=True, text=True,
                          timeout=150, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert done.returncode != 0
    reason = f"data folder {missing} does not exist or is not a folder"
    lines = done.stderr.splitlines()
    assert f"error: {reason}" in lines and f"error: rank 0 stopped: {reason}" in lines
    assert "Connection closed" not in done.stderr
