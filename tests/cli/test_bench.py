"""`skinml bench`: the config it measures, and option mistakes before any measuring."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from skinml.cli import main
from skinml.cli.bench import _bench_config

from ..conftest import skinml_in_process, tiny


def test_bench_defaults_to_the_demo_config_on_a_cpu_and_checks_concurrency_first():
    expected = "resnext50_32x4d" if torch.cuda.is_available() else "resnext_small"
    assert _bench_config(None, None, ()).model.arch == expected
    result = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "4,x"])
    assert result.exit_code == 2 and "'4,x' is not a list of numbers" in result.output


@pytest.mark.parametrize("args, reason", [
    (["bench", "serve", "--repeats", "0"], "0 is not in the range x>=1"),
    (["bench", "serve", "--servers", "mlflow,torchserve"], "choose from mlflow, mlserver"),
    (["bench", "serve", "--workers", "2,x"], "'2,x' is not a list of numbers"),
    (["bench", "serve", "--workers", "0"], "at least one count >= 1"),
    (["bench", "spark", "--images", "10"], "10 is not in the range x>=64"),
    (["bench", "predict", "--images", "10"], "10 is not in the range x>=64"),
    (["bench", "tune", "--workers", "0"], "at least one count >= 1"),
    (["bench", "tune", "--trials", "1"], "1 is not in the range x>=2"),
])
def test_option_mistakes_of_bench_are_exit_2_before_any_work(args, reason):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and reason in result.output


@pytest.mark.parametrize("args, notice, last", [
    (["loader", "--batches", "2", "--workers", "0"],
     "measuring 2 batches of 8 at 32 px, ours then the seed path (0 workers)", "ratio: "),
    (["train", "--steps", "2"], "measuring 2 steps of resnext_small at 32 px",
     "end to end / ceiling: "),
])
def test_bench_prints_its_table_alone_to_stdout_after_the_work(make_folder, args, notice, last):
    folder = make_folder()
    shutil.copy(next(folder.glob("*.jpg")), folder / "ISIC_9999999.jpg")  # logs a warning
    result = skinml_in_process("bench", *args, *_tiny_sets(folder), "--set", "optim.batch_size=8")
    assert result.returncode == 0, result.stderr
    # stdout: the machine, one row per measurement, the ratio; the logs went to stderr
    machine, *rows, summary = result.stdout.splitlines()
    assert machine.startswith("machine: ") and summary.startswith(last)
    assert len(rows) == 2 and all(" images/s  " in row for row in rows), result.stdout
    assert result.stderr.splitlines()[0] == notice
    assert "WARNING: ignored 1 image files in" in result.stderr


@pytest.mark.slow
def test_bench_tune_prints_trials_per_hour_and_time_outside_epochs(make_folder, tmp_path):
    folder = make_folder()
    result = skinml_in_process("bench", "tune", "--trials", "2", "--epochs", "1",
                               "--workers", "1", "--work-dir", str(tmp_path / "work"),
                               *_tiny_sets(folder))
    assert result.returncode == 0, result.stderr
    machine, header, row = result.stdout.splitlines()
    assert machine.startswith("machine: ") and "trials/hour" in header
    workers, per_hour, ratio, *_ = row.split()
    assert workers == "1" and float(per_hour) > 0 and ratio == "1.00x"
    # each count is a study in a store of its own, under --work-dir
    assert (tmp_path / "work" / "workers-1" / "mlflow.db").is_file()


def test_bench_train_on_a_split_smaller_than_a_batch_is_one_error_line(make_folder):
    folder = make_folder()  # 15 training images; tiny's batch is 16
    result = skinml_in_process("bench", "train", "--steps", "2", *_tiny_sets(folder))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"error: {folder}: the training split has 15 images, fewer than one batch "
        "(optim.batch_size=16)")


def _tiny_sets(folder) -> list[str]:
    sets = [item for override in tiny(None) for item in ("--set", override)]
    return ["--config", "demo", "--data-dir", str(folder), *sets]
