"""`skinml data`: the bundled sample's table by default (the folder errors are tested with
the data layer, tests/data/)."""

from __future__ import annotations

from ..conftest import skinml


def test_data_check_without_argument_prints_the_sample_table():
    result = skinml("data", "check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "images           660 (missing 0, corrupt 0, without metadata 0)"
    assert lines[2] == "lesions          450"
    assert lines[-1].split() == ["total", "660", "450"]
    assert "nv                  Melanocytic nevi     250      193" in result.stdout
