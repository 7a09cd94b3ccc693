"""The `skinml` command group: help on every command, and click's usage errors: one line,
exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main

COMMANDS = [[], ["data"], ["data", "check"], ["data", "prepare"], ["data", "synth"],
            ["train"], ["cv"], ["tune"], ["pipeline"], ["register"], ["compare"], ["serve"],
            ["predict"], ["evaluate"], ["explain"], ["bench"], ["bench", "loader"],
            ["bench", "train"], ["bench", "serve"], ["bench", "tune"], ["bench", "gpu"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "skinml" for c in COMMANDS])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output


@pytest.mark.parametrize("args, message", [
    (["data", "check", "--bogus"], "No such option '--bogus'"),
    (["cv", "--folds", "1"], "Invalid value for --folds: needs at least 2 folds"),
    (["tune", "--n-trials", "0"], "Invalid value for '--n-trials': 0 is not in the range"),
    (["serve", "--port", "99999"], "Invalid value for '--port': 99999 is not in the range"),
    (["compare", "models:/a/1"], "Missing argument 'MODEL_B'"),
    (["pipeline", "--folds", "1"], "Invalid value for --folds: must be at least 2, got 1"),
    (["--bogus"], "No such option '--bogus'"),
    (["nocommand"], "No such command 'nocommand'"),
])
def test_a_usage_error_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()  # no usage block, no "Try ... --help"
    assert line.startswith("error: ") and message in line


def test_option_types_and_defaults_read_as_they_work():
    train = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--epochs INT" in train and "--pretrained [true|false]" in train
    assert "[default: demo]" in train
    assert "[default: 5001;" in CliRunner().invoke(main, ["serve", "--help"]).output
    force = CliRunner().invoke(main, ["register", "--help"]).output
    assert "--force [true|false]" in force and "BOOLEAN" not in force
