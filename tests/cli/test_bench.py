"""`skinml bench`: the config it measures, and option mistakes before any measuring."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from skinml.cli import main
from skinml.cli.bench import _bench_config


def test_bench_defaults_to_the_demo_config_on_a_cpu_and_checks_concurrency_first():
    expected = "resnext50_32x4d" if torch.cuda.is_available() else "resnext_small"
    assert _bench_config(None, None, ()).model.arch == expected
    result = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "4,x"])
    assert result.exit_code == 2 and "'4,x' is not a list of numbers" in result.output


@pytest.mark.parametrize("args, reason", [
    (["bench", "serve", "--repeats", "0"], "0 is not in the range x>=1"),
])
def test_option_mistakes_of_bench_are_exit_2_before_any_work(args, reason):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and reason in result.output
