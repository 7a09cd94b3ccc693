"""The `skinml` command: help everywhere, the bundled sample's table by default."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main

from .data.test_metadata import skinml_cli


def test_data_check_without_argument_prints_the_sample_table():
    result = skinml_cli("data", "check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "images           660 (missing 0, corrupt 0, without metadata 0)"
    assert lines[2] == "lesions          450"
    assert lines[-1].split() == ["total", "660", "450"]
    assert "nv                  Melanocytic nevi     250      193" in result.stdout


@pytest.mark.parametrize("command", [[], ["data"], ["data", "check"], ["data", "prepare"],
                                     ["data", "synth"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output


def test_unknown_option_is_a_usage_error_with_exit_2():
    result = CliRunner().invoke(main, ["data", "check", "--bogus"])
    assert result.exit_code == 2


def test_option_types_and_defaults_read_as_they_work():
    train = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--epochs INT" in train and "--pretrained [true|false]" in train
    assert "[default: demo]" in train
    assert "[default: 5001;" in CliRunner().invoke(main, ["serve", "--help"]).output
    force = CliRunner().invoke(main, ["register", "--help"]).output
    assert "--force [true|false]" in force and "BOOLEAN" not in force


def test_bench_defaults_to_the_demo_config_on_a_cpu_and_checks_concurrency_first():
    import torch

    from skinml.cli import _bench_config

    expected = "resnext50_32x4d" if torch.cuda.is_available() else "resnext_small"
    assert _bench_config(None, None, ()).model.arch == expected
    result = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "4,x"])
    assert result.exit_code == 2 and "'4,x' is not a list of numbers" in result.output


@pytest.mark.parametrize("args, reason", [
    (["cv", "--folds", "1"], "needs at least 2 folds"),
    (["cv", "--folds", "x"], "'x' is not a whole number"),
    (["serve", "--mlserver", "--timeout", "5"], "is for mlflow models serve, not MLServer"),
    (["serve", "--mlserver", "--workers", "2"], "is for mlflow models serve, not MLServer"),
    (["bench", "serve", "--repeats", "0"], "0 is not in the range x>=1"),
])
def test_option_mistakes_of_cv_and_serve_are_exit_2_before_any_work(args, reason):
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
