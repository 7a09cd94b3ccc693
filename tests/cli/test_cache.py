"""`skinml cache ls` and `prune`: one line per entry and a total; by default prune frees
finished runs' checkpoints and MLServer folders, more only when asked (what each option
picks is tested with the workflow, tests/workflows/test_cache.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skinml.data.cache import cache_root

from ..conftest import skinml_in_process
from ..workflows.test_cache import STRANGER, age, cache_of_every_kind, checkpoint


@pytest.fixture
def every_kind(tracking, make_folder) -> dict[str, Path]:
    return cache_of_every_kind(make_folder(lesions_per_class=1))


def lines_about(output: str, folder: Path) -> list[str]:
    return [line for line in output.splitlines() if line.split()[:1] == [folder.name]]


def test_ls_lists_each_kind_with_sizes_run_status_and_a_total(every_kind, tracking):
    result = skinml_in_process("cache", "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    root = cache_root()
    assert lines[0] == f"image caches in {root}"
    assert lines[3] == f"checkpoints in {root / 'checkpoints'}"
    assert lines[9] == f"MLServer folders in {root / 'mlserver'}"
    [image] = lines_about(result.stdout, every_kind["images"])
    assert re.fullmatch(rf"  {every_kind['images'].name}  +\d+\.\d KiB  used \S+ \S+  "
                        r"8 px \(\d+x8\), \d+ images", image), image
    for name, status in (("finished", "FINISHED"), ("killed", "KILLED"),
                         ("failed", "FAILED"), ("running", "RUNNING")):
        [line] = lines_about(result.stdout, every_kind[name])
        assert line.split()[1:3] == ["3.0", "MiB"] and line.endswith(f"  {status}"), line
    [stranger] = lines_about(result.stdout, every_kind["stranger"])
    assert stranger.endswith(f"  not in {tracking}")
    assert re.fullmatch(r"total \d+\.\d MiB in 8 entries", lines[-1]), lines[-1]


def test_prune_frees_finished_runs_checkpoints_and_mlserver_folders(every_kind):
    result = skinml_in_process("cache", "prune")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"removed checkpoint {every_kind['finished']} (3.0 MiB, FINISHED)"
    assert lines[1].startswith(f"removed MLServer folder {every_kind['mlserver']} (")
    assert re.fullmatch(r"freed 3\.0 MiB \(2 entries\)", lines[2]), lines[2]
    assert lines[3].startswith("kept 6 entries, ")
    gone = {"finished", "mlserver"}
    assert {name for name, folder in every_kind.items() if not folder.exists()} == gone


def test_dry_run_removes_nothing(every_kind):
    result = skinml_in_process("cache", "prune", "--all", "--dry-run")
    assert result.returncode == 0, result.stderr
    would = [line for line in result.stdout.splitlines() if line.startswith("would remove ")]
    assert len(would) == len(every_kind)
    assert result.stdout.splitlines()[-1].startswith("would free ")
    assert all(folder.exists() for folder in every_kind.values())


def test_a_running_or_unknown_runs_checkpoint_stays_unless_all(every_kind):
    result = skinml_in_process("cache", "prune", "--checkpoints")
    assert result.returncode == 0, result.stderr
    assert every_kind["running"].exists() and not every_kind["killed"].exists()
    assert every_kind["stranger"].exists()  # maybe running in another store
    assert every_kind["images"].exists() and every_kind["mlserver"].exists()
    result = skinml_in_process("cache", "prune", "--checkpoints", "--all")
    assert result.stdout.splitlines()[0].endswith("(3.0 MiB, RUNNING)")
    assert not every_kind["running"].exists()


def test_older_than_frees_only_what_was_not_used_for_that_long(every_kind):
    age(every_kind["images"], days=3)
    result = skinml_in_process("cache", "prune", "--images", "--older-than", "2")
    assert result.stdout.splitlines()[0].startswith(f"removed image cache {every_kind['images']}")
    assert not every_kind["images"].exists() and every_kind["build"].exists()
    result = skinml_in_process("cache", "prune", "--older-than", "2")
    assert result.stdout.splitlines()[0] == "freed 0 B (0 entries)"


def test_checkpoint_dir_lists_checkpoints_kept_elsewhere(unmade_tracking, tmp_path):
    folder = checkpoint(STRANGER, root=tmp_path / "shared-checkpoints")
    result = skinml_in_process("cache", "ls", "--checkpoint-dir", str(folder.parent))
    assert lines_about(result.stdout, folder)[0].endswith(f"not in {unmade_tracking}")
    assert not (tmp_path / "mlflow.db").exists()  # reading made no tracking store


@pytest.mark.parametrize("command", ["ls", "prune"])
def test_a_missing_cache_dir_is_one_error_line(tmp_path, command):
    result = skinml_in_process("cache", command, "--cache-dir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr == f"error: --cache-dir {tmp_path / 'nope'}: no such folder\n"
