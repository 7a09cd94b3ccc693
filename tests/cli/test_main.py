"""The `skinml` command group: help on every command, and click's usage errors (exit 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main

COMMANDS = [[], ["data"], ["data", "check"], ["data", "prepare"], ["data", "synth"],
            ["train"], ["cv"], ["tune"], ["register"], ["compare"], ["serve"], ["predict"],
            ["evaluate"], ["explain"], ["bench"], ["bench", "loader"], ["bench", "train"],
            ["bench", "serve"], ["bench", "gpu"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "skinml" for c in COMMANDS])
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
