"""Which files `skinml predict` reads, in which order: folders walked lazily and sorted,
globs, list files, and a one-line error for a name that leads nowhere."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from skinml.data.errors import DataError
from skinml.data.image_files import ImageSources


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_a_folder_is_walked_depth_first_in_name_order_images_only(tmp_path):
    _touch(tmp_path, "b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.tif", "notes.txt",
           ".hidden.jpg", ".cache/e.jpg", "z/f.webp")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a link to a folder is not followed
    sources = ImageSources.resolve([str(tmp_path)])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in sources.paths()] == [
        "a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.tif", "z/f.webp"]
    assert list(sources.paths()) == list(sources.paths())  # the same order every walk


def test_files_globs_and_list_files_keep_their_order(tmp_path, monkeypatch):
    _touch(tmp_path, "x/1.jpg", "x/2.jpg", "y/3.jpg", "y/sub/4.jpg", "lone.jpg")
    listing = tmp_path / "x" / "list.txt"
    listing.write_text("# scored last\n2.jpg\n\n../y/3.jpg\nmissing.jpg\n")
    monkeypatch.chdir(tmp_path)
    sources = ImageSources.resolve(["lone.jpg", "y/**/*.jpg"], [str(listing)])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in sources.paths()] == [
        "lone.jpg", "y/3.jpg", "y/sub/4.jpg", "x/2.jpg", "y/3.jpg", "x/missing.jpg"]
    assert all(os.path.isabs(p) for p in sources.paths())  # a resume from elsewhere agrees


@pytest.mark.parametrize("given, message", [
    ("nowhere.jpg", "nowhere.jpg: no such file or folder"),
    ("*.png", "pattern *.png matches no files"),
    ("empty", "folder empty holds no images"),
])
def test_a_name_that_leads_nowhere_is_one_line(tmp_path, monkeypatch, given, message):
    (tmp_path / "empty").mkdir()
    _touch(tmp_path, "empty/readme.txt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        ImageSources.resolve([given])
    with pytest.raises(DataError, match="--list gone.txt: no such file"):
        ImageSources.resolve([], ["gone.txt"])
    with pytest.raises(DataError, match="no images given"):
        ImageSources.resolve([], [])
