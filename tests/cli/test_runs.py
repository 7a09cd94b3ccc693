"""`skinml train`, `cv` and `tune`: option mistakes are one line and exit 2 before any work;
Ctrl-C is one line naming the command that continues the run, and exit 130."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from skinml.cli import main, runs
from skinml.data.cache import cache_root

from ..conftest import DEMO, skinml_in_process, tiny


@pytest.mark.parametrize("args, reason", [
    (["cv", "--folds", "1"], "needs at least 2 folds"),
    (["cv", "--folds", "x"], "'x' is not a whole number"),
])
def test_option_mistakes_of_cv_are_exit_2_before_any_work(args, reason):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and reason in result.output


@pytest.mark.parametrize("args, reason", [
    (["tune", "--max-trials", "x"], "'x' is not a whole number"),
    (["tune", "--n-trials", "4", "--max-trials", "3"], "3 is below --n-trials 4"),
    (["tune", "--objective", "cv", "--folds", "1"], "1 is not in the range x>=2"),
    (["tune", "--pruner-warmup-epochs", "-1"], "must be at least 0, got -1"),
    (["tune", "--pruner-warmup-epochs", "two"], "'two' is not a whole number"),
])
def test_tune_option_mistakes_are_exit_2_before_any_study(args, reason, tmp_path):
    result = CliRunner().invoke(main, [*args, "--storage", f"sqlite:///{tmp_path / 'o.db'}"])
    assert result.exit_code == 2 and reason in result.output
    assert not (tmp_path / "o.db").exists()


def _interrupt_after_first_checkpoint(args: list[str], log: Path, checkpoints: Path
                                      ) -> subprocess.CompletedProcess:
    """`skinml ARGS` in its own interpreter, Ctrl-C (SIGINT) once a checkpoint holds an
    epoch; its stderr goes to `log`, as when a user keeps logs in files."""
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "skinml", *args],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.monotonic() + 300
        while not any(_epochs(path) for path in checkpoints.glob("*/last.pt")):
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, stdout, log.read_text())


def _epochs(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["state"]["epoch"]
    except (OSError, RuntimeError, EOFError):  # being replaced right now
        return 0


@pytest.mark.slow
def test_ctrl_c_prints_the_resume_command_and_exits_130(tracking, make_folder, tmp_path):
    folder = make_folder("interrupt", lesions_per_class=5)
    checkpoints = cache_root() / "checkpoints"
    stopped = _interrupt_after_first_checkpoint(
        ["train", "--config", str(DEMO), *[f"--set={o}" for o in tiny(folder, "optim.epochs=40")]],
        tmp_path / "train.log", checkpoints)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and "Aborted" not in stopped.stderr
    lines = stopped.stderr.splitlines()
    (run,) = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    run_id, experiment = run.info.run_id, run.info.experiment_id
    assert [line for line in lines if "tracking store" in line] == [
        f"INFO: tracking store {tracking} (browse: `mlflow ui`; MLFLOW_TRACKING_URI picks "
        "another)"]
    # the run's page, in the UI's Model training view (not its GenAI view)
    assert (f"INFO: training run {run_id} started: http://127.0.0.1:5000/#/experiments/"
            f"{experiment}/runs/{run_id}?workflowType=machine_learning") in lines
    assert lines[-1] == (f"interrupted: run {run_id} is marked KILLED; continue it with: "
                         f"skinml train --resume {run_id}")
    assert mlflow.get_run(run_id).info.status == "KILLED"
    checkpoint = checkpoints / run_id / "last.pt"
    assert checkpoint.is_file()  # kept for --resume

    resumed = skinml_in_process("train", "--resume", run_id, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert not checkpoint.exists()  # finished: its best weights are in the logged model


@pytest.mark.slow
def test_ctrl_c_in_a_fold_names_the_cross_validation_to_resume(tracking, make_folder,
                                                                 tmp_path):
    folder = make_folder("interrupt-cv", lesions_per_class=5)
    stopped = _interrupt_after_first_checkpoint(
        ["cv", "--config", str(DEMO), "--folds", "2",
         *[f"--set={o}" for o in tiny(folder, "optim.epochs=40")]],
        tmp_path / "cv.log", cache_root() / "checkpoints")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=["skin-lesion"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["skinml.role"] == "cv"]
    (fold,) = [r for r in runs if r.data.tags["skinml.role"] == "training"]
    assert {parent.info.status, fold.info.status} == {"KILLED"}
    parent_id = parent.info.run_id
    assert stopped.stderr.splitlines()[-1] == (
        f"interrupted: run {parent_id} is marked KILLED; continue it with: "
        f"skinml cv --resume {parent_id}")


def test_nproc_relaunches_under_torchrun_and_echoes_the_whole_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["skinml", "train", "--nproc", "2", "--epochs", "1"])
    launched = []
    monkeypatch.setattr(runs.os, "execv", lambda path, argv: launched.append((path, argv)))
    runs._relaunch_under_torchrun(2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "skinml", "train", "--epochs", "1"]
    assert launched == [(sys.executable, command)]
    assert capsys.readouterr().err == shlex.join(command) + "\n"


# In a fresh interpreter: what the command imported when it stopped or handed over.
_IMPORTED_WHEN_DONE = """
import atexit, os, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
os.execv = lambda path, argv: sys.exit(f"exec {' '.join(argv[1:5])}")
from skinml.cli import main
sys.argv = ["skinml", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("args, last_lines, under_mlflow_run", [
    (["cv", "--folds", "1"], ["error: Invalid value for --folds: needs at least 2 folds"], True),
    (["tune", "--n-trials", "4", "--max-trials", "3"],
     ["error: Invalid value for --max-trials: 3 is below --n-trials 4"], False),
    (["pipeline", "--folds", "1"], ["error: Invalid value for --folds: must be at least 2, got 1"],
     False),
    (["train", "--epochs", "-1"], ["error: --epochs: optim.epochs must be at least 1, got -1"],
     False),
    (["tune", "--set", "optim.lr=abc"],
     ["error: override optim.lr=abc: optim.lr must be float, got 'abc'"], False),
    # refused once, not by each rank torchrun would start
    (["train", "--nproc", "2", "--overrides", "model.image_size=0"],
     ["error: override model.image_size=0: model.image_size must be between 16 and 1024, "
      "got 0"], False),
    (["train", "--nproc", "2"], ["exec -m torch.distributed.run --standalone --nproc_per_node=2"],
     False),
], ids=["cv", "tune", "pipeline", "train-range", "tune-type", "train-nproc-range",
        "train-nproc"])
def test_refusals_and_the_torchrun_relaunch_come_before_torch_is_imported(
        args, last_lines, under_mlflow_run, tmp_path):
    """A mistyped option answers at once (under `mlflow run` too, which tags its run with the
    reason), and `--nproc` hands over to torchrun before the ~7 s of imports that every rank
    then does again."""
    env = dict(os.environ)
    if under_mlflow_run:
        env.update(MLFLOW_RUN_ID="0" * 32,  # a run the store does not hold: no tag
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-c", _IMPORTED_WHEN_DONE, *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().splitlines()[-2:] == [*last_lines, "torch imported: False"], \
        done.stderr[-2000:]
