"""`skinml cv` and `tune`: option mistakes are one line and exit 2 before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main


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
