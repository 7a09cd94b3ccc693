"""The cache listed by kind, each checkpoint with its run's status; what pruning picks; removal
that stays inside the folder an entry was listed from (the command: tests/cli/test_cache.py)."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from skinml.core.errors import SkinmlError
from skinml.data import load_ham10000
from skinml.data.cache import cache_root, open_cache, prepare_cache
from skinml.training.checkpoint import CANDIDATE_FILE
from skinml.workflows.cache import list_cache, remove_entry, select_for_pruning

STATUSES = ("FINISHED", "KILLED", "FAILED", "RUNNING")
STRANGER = "f" * 32  # a run id the tracking store does not hold
CHECKPOINT_BYTES = 3 * 2**20


def run_in_state(status: str) -> str:
    """A run in the active tracking store, ended with `status` (RUNNING: never ended)."""
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def checkpoint(run_id: str, root: Path | None = None) -> Path:
    """A stand-in for a run's last.pt (nothing here reads its content); its folder."""
    path = (root or cache_root() / "checkpoints") / run_id / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(CHECKPOINT_BYTES))
    return path.parent


def mlserver_folder(run_id: str) -> Path:
    """What `skinml serve --mlserver` leaves: the model with its MLmodel, and settings."""
    folder = cache_root() / "mlserver" / "0123456789abcdef"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "MLmodel").write_text(f"model_id: m-0123\nrun_id: {run_id}\n")
    (folder / "settings.json").write_text("{}")
    return folder


def cache_of_every_kind(ham: Path) -> dict[str, Path]:
    """In the active tracking store and SKINML_CACHE: an image cache of `ham`, a build of one
    in progress, a checkpoint of a run in each state and of a run the store does not hold,
    and an MLServer folder. Their folders, by name."""
    image_cache = prepare_cache(load_ham10000(ham), size=8, progress=False).path
    build = cache_root() / f".tmp-{image_cache.name}-{socket.gethostname()}-{os.getpid()}"
    build.mkdir()
    (build / "images.npy").write_bytes(bytes(100))
    runs = {status.lower(): run_in_state(status) for status in STATUSES}
    return {"images": image_cache, "build": build,
            **{name: checkpoint(run_id) for name, run_id in runs.items()},
            "stranger": checkpoint(STRANGER), "mlserver": mlserver_folder(runs["finished"])}


def age(folder: Path, days: float) -> None:
    """Make everything in `folder` last used and modified `days` ago."""
    then = time.time() - days * 86_400
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


@pytest.fixture
def every_kind(tracking, make_folder) -> dict[str, Path]:
    return cache_of_every_kind(make_folder(lesions_per_class=1))


def names(entries) -> set[str]:
    return {entry.name for entry in entries}


def test_each_checkpoint_is_listed_with_its_runs_status(every_kind, tracking):
    checkpoints = list_cache(cache_root()).of_kind("checkpoints")
    by_folder = {every_kind[name].name: name for name in
                 ("finished", "killed", "failed", "running", "stranger")}
    assert {by_folder[entry.name]: entry.status for entry in checkpoints} == {
        "finished": "FINISHED", "killed": "KILLED", "failed": "FAILED", "running": "RUNNING",
        "stranger": None}
    stranger = next(entry for entry in checkpoints if entry.name == STRANGER)
    assert stranger.about == f"not in {tracking}"
    assert {entry.nbytes for entry in checkpoints} == {CHECKPOINT_BYTES}


def test_an_image_cache_is_listed_with_its_frame_and_image_count(every_kind):
    listing = list_cache(cache_root())
    images = {entry.name: entry for entry in listing.of_kind("images")}
    cache = open_cache(every_kind["images"])
    count, height, width, _ = cache.images.shape
    entry = images[cache.path.name]
    assert entry.about == f"8 px ({width}x{height}), {count} images"
    assert entry.nbytes == sum(f.stat().st_size for f in cache.path.iterdir())
    assert entry.nbytes > cache.nbytes
    assert images[every_kind["build"].name].building
    assert listing.of_kind("mlserver")[0].about.endswith(f"of run {every_kind['finished'].name}")
    assert listing.nbytes == sum(entry.nbytes for entry in listing.entries)


def test_listing_never_creates_a_tracking_store(unmade_tracking, tmp_path):
    checkpoint(STRANGER)
    [entry] = list_cache(cache_root()).entries
    assert entry.status is None and entry.about == f"not in {unmade_tracking}"
    assert not (tmp_path / "mlflow.db").exists()


def test_folders_skinml_did_not_name_are_neither_listed_nor_pruned(tracking):
    root = cache_root()
    for folder in ("notes", "checkpoints/not-a-run", "mlserver/models", "0123456789abcdef"):
        (root / folder).mkdir(parents=True)
        (root / folder / "keep.txt").write_text("mine")
    listing = list_cache(root)
    assert listing.entries == ()
    assert select_for_pruning(listing, everything=True) == []


def test_by_default_pruning_picks_finished_runs_checkpoints_and_mlserver_folders(every_kind):
    chosen = select_for_pruning(list_cache(cache_root()))
    assert names(chosen) == {every_kind["finished"].name, every_kind["mlserver"].name}


def test_a_tuning_trials_candidate_is_kept_until_its_study_drops_it(tracking):
    """A finished trial's run keeps its best-epoch weights while it may be its study's best:
    only --all prunes them."""
    folder = checkpoint(run_in_state("FINISHED"))
    (folder / "last.pt").rename(folder / CANDIDATE_FILE)
    listing = list_cache(cache_root())
    [entry] = listing.of_kind("checkpoints")
    assert entry.candidate and entry.protected and "tuning trial" in entry.about
    assert select_for_pruning(listing) == []
    assert select_for_pruning(listing, ["checkpoints"]) == []
    assert names(select_for_pruning(listing, everything=True)) == {folder.name}


def test_a_kind_picks_all_of_it_but_running_or_unknown_runs_checkpoints_and_a_build(
        every_kind):
    listing = list_cache(cache_root())
    assert names(select_for_pruning(listing, ["checkpoints"])) == {
        every_kind[name].name for name in ("finished", "killed", "failed")}
    assert names(select_for_pruning(listing, ["images"])) == {every_kind["images"].name}


def test_all_picks_a_running_runs_checkpoint_and_a_build_too(every_kind):
    listing = list_cache(cache_root())
    assert names(select_for_pruning(listing, everything=True)) == {
        folder.name for folder in every_kind.values()}
    assert every_kind["running"].name in names(
        select_for_pruning(listing, ["checkpoints"], everything=True))


def test_older_than_picks_only_what_was_not_used_for_that_long(every_kind):
    for name in ("images", "killed", "running", "stranger"):
        age(every_kind[name], days=10)
    listing = list_cache(cache_root())
    assert names(select_for_pruning(listing, older_than_days=5)) == {
        every_kind["images"].name, every_kind["killed"].name}
    assert names(select_for_pruning(listing, ["checkpoints"], older_than_days=5)) == {
        every_kind["killed"].name}
    assert names(select_for_pruning(listing, ["checkpoints"], older_than_days=11)) == set()


def test_an_image_cache_opened_lately_is_not_old(every_kind):
    age(every_kind["images"], days=10)
    images = every_kind["images"] / "images.npy"
    os.utime(images, (time.time(), images.stat().st_mtime))  # what opening it does
    listing = list_cache(cache_root())
    assert select_for_pruning(listing, ["images"], older_than_days=5) == []


@pytest.mark.parametrize("kinds, older_than, message", [
    (["models"], None, "unknown cache kind models (choose from images, checkpoints, mlserver)"),
    ([], -1.0, "--older-than must be at least 0 days, got -1.0"),
])
def test_an_unknown_kind_or_a_negative_age_is_refused(tracking, kinds, older_than, message):
    with pytest.raises(SkinmlError) as error:
        select_for_pruning(list_cache(cache_root()), kinds, older_than)
    assert str(error.value) == message


def test_removing_an_entry_deletes_its_folder(every_kind):
    [finished] = [entry for entry in list_cache(cache_root()).entries
                  if entry.path == every_kind["finished"]]
    remove_entry(finished)
    assert not every_kind["finished"].exists()
    assert every_kind["killed"].exists()


def test_removal_never_reaches_outside_the_folder_an_entry_came_from(tracking, tmp_path):
    elsewhere = checkpoint(STRANGER, root=tmp_path / "elsewhere")
    linked = cache_root() / "checkpoints" / ("e" * 32)
    linked.parent.mkdir(parents=True)
    linked.symlink_to(elsewhere, target_is_directory=True)
    assert list_cache(cache_root()).entries == ()  # a link is not an entry
    [entry] = list_cache(tmp_path, checkpoint_root=tmp_path / "elsewhere").entries
    for crafted in (dataclasses.replace(entry, root=cache_root() / "checkpoints"),
                    dataclasses.replace(entry, path=linked, root=linked.parent)):
        with pytest.raises(SkinmlError, match="refusing to remove"):
            remove_entry(crafted)
    assert (elsewhere / "last.pt").stat().st_size == CHECKPOINT_BYTES
