"""Image files named by folders, glob patterns and list files: one stable order, streamed.

`skinml predict` scores archives of millions of files, so a folder is walked lazily (each
directory's entries sorted by name) and never listed whole; a resumed run walks the same
order again and skips what is done. A glob pattern is expanded and sorted in full (paths
only), a list file is read a line at a time.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from skinml.data.errors import DataError

# What a folder walk picks up (a list file or a file argument may name anything).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ImageSources:
    """Files, folders (recursive) and glob patterns, then list files (one path per line;
    relative paths are relative to the list file's folder), all made absolute."""

    items: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, items: list[str] | tuple[str, ...], lists: list[str] | tuple[str, ...] = ()
                ) -> ImageSources:
        """Checked before any work: each item exists or is a pattern that matches, each list
        file can be read (DataError naming the first that does not)."""
        if not items and not lists:
            raise DataError("no images given: name files, folders, glob patterns or --list FILE")
        resolved = []
        for item in items:
            path = os.path.abspath(os.path.expanduser(item))
            if _is_pattern(item) and not os.path.exists(path):
                if not any(_glob(path)):
                    raise DataError(f"pattern {item} matches no files")
            elif os.path.isdir(path):
                if not any(_walk(path)):
                    raise DataError(f"folder {item} holds no images "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            elif not os.path.isfile(path):
                raise DataError(f"{item}: no such file or folder")
            resolved.append(path)
        list_files = []
        for name in lists:
            path = os.path.abspath(os.path.expanduser(name))
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise DataError(f"--list {name}: no such file, or it cannot be read")
            list_files.append(path)
        return cls(tuple(resolved), tuple(list_files))

    def paths(self) -> Iterator[str]:
        """Every image path, in the same order each time the inputs are unchanged."""
        for item in self.items:
            if _is_pattern(item) and not os.path.exists(item):
                yield from _glob(item)
            elif os.path.isdir(item):
                yield from _walk(item)
            else:
                yield item
        for list_file in self.lists:
            yield from _listed(list_file)

    def describe(self) -> dict[str, list[str]]:
        return {"items": list(self.items), "lists": list(self.lists)}


def _is_pattern(item: str) -> bool:
    return bool(_GLOB_CHARS & set(item))


def _glob(pattern: str) -> list[str]:
    return sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))


def _walk(folder: str) -> Iterator[str]:
    """Image files under `folder`, depth first, names sorted; hidden entries and links to
    folders are skipped (a link cycle would never end)."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted((entry for entry in scan if not entry.name.startswith(".")),
                             key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror})") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield entry.path


def _listed(list_file: str) -> Iterator[str]:
    """Paths in a list file: blank lines and lines starting with # are skipped."""
    base = os.path.dirname(list_file)
    with open(list_file, encoding="utf-8") as lines:
        for line in lines:
            name = line.strip()
            if name and not name.startswith("#"):
                yield os.path.normpath(os.path.join(base, os.path.expanduser(name)))
