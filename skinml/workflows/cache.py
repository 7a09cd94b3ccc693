"""What skinml keeps on disk beside the tracking store, and freeing it.

Three kinds of folder, each one safe to delete:
- image caches, `<cache root>/<digest>/` (skinml/data/cache.py): the next `skinml data
  prepare` or training run on the same images builds it again;
- checkpoints, `<cache root>/checkpoints/<run_id>/` (or `runtime.checkpoint_dir`): only
  `skinml train --resume` of a killed or failed run reads one; a finished run's best weights
  are in its logged model, except a tuning trial's candidate (`candidate.pt`): the weights
  a study logs at its end if that trial is its best;
- MLServer folders, `<cache root>/mlserver/<digest>/` (skinml/serving/mlserver.py): the next
  `skinml serve --mlserver` downloads the model again.

Only folders named as skinml names them are listed, and only those are ever removed, so a
wrong `--cache-dir` deletes nothing of anyone else's. Reading a checkpoint's run status never
creates a tracking store.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import yaml

from skinml.core.errors import SkinmlError
from skinml.data.cache import BUILD_PREFIX, IMAGES_FILE, KEY_DIGITS, cache_meta
from skinml.tracking.reader import run_status
from skinml.tracking.store import require_tracking_store, shown_uri
from skinml.training.checkpoint import CANDIDATE_FILE

KINDS = ("images", "checkpoints", "mlserver")
RUNNING = "RUNNING"
FINISHED = "FINISHED"

# The names skinml gives its folders: a cache key (or a build of one in progress), an
# MLflow run id, 16 digits of the model URI's SHA-256 (serving/mlserver.py).
_IMAGE_CACHE = re.compile(f"[0-9a-f]{{{KEY_DIGITS}}}")
_IMAGE_BUILD = re.compile(f"{re.escape(BUILD_PREFIX)}[0-9a-f]{{{KEY_DIGITS}}}-.+")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MLSERVER = re.compile(r"[0-9a-f]{16}")
_DAY = 86_400


@dataclass(frozen=True)
class CacheEntry:
    """One folder of the cache: what it holds, its size, and when it was last used."""

    kind: str  # one of KINDS
    path: Path
    root: Path  # the folder it was found in: removal never reaches outside it
    nbytes: int
    last_used: float  # seconds since the epoch: newest mtime (and the images' atime)
    about: str  # image frame and count, a run's status, ...
    status: str | None = None  # a checkpoint's run status; None: not in the tracking store
    building: bool = False  # an image cache not complete yet (may be a build in progress)
    candidate: bool = False  # a trial's best-epoch weights its study may still log

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def protected(self) -> bool:
        """Removed only with `--all`: a build in progress, a study's candidate, and the
        checkpoint of a run that is RUNNING or that this store does not hold (it may be
        running in another store)."""
        unknown_run = self.kind == "checkpoints" and self.status is None
        return self.status == RUNNING or unknown_run or self.building or self.candidate


@dataclass(frozen=True)
class CacheListing:
    root: Path
    checkpoint_root: Path
    entries: tuple[CacheEntry, ...]

    def of_kind(self, kind: str) -> list[CacheEntry]:
        return [entry for entry in self.entries if entry.kind == kind]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)


def list_cache(root: Path, checkpoint_root: Path | None = None) -> CacheListing:
    """Every image cache, checkpoint and MLServer folder under `root` (checkpoints under
    `checkpoint_root`, by default `root`/checkpoints), each checkpoint with its run's status."""
    root = Path(root).expanduser()
    checkpoint_root = Path(checkpoint_root or root / "checkpoints").expanduser()
    entries = [*_image_caches(root), *_checkpoints(checkpoint_root),
               *(_entry("mlserver", path, root / "mlserver", _served_model(path))
                 for path in _folders(root / "mlserver", _MLSERVER))]
    return CacheListing(root, checkpoint_root, tuple(entries))


def select_for_pruning(listing: CacheListing, kinds: Iterable[str] = (),
                       older_than_days: float | None = None, everything: bool = False
                       ) -> list[CacheEntry]:
    """What `skinml cache prune` removes.

    With no kind, age or `everything`: checkpoints of runs that FINISHED in this tracking
    store and MLServer folders. A kind: all of that kind. `older_than_days`: only what has
    not been used for that long (of all kinds unless some are named). The checkpoint of a
    running run or of one this store does not hold, and an image cache still being built,
    go only with `everything`.
    """
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise SkinmlError(f"unknown cache kind {sorted(unknown)[0]} "
                          f"(choose from {', '.join(KINDS)})")
    if older_than_days is not None and older_than_days < 0:
        raise SkinmlError(f"--older-than must be at least 0 days, got {older_than_days}")
    if not kinds and older_than_days is None and not everything:
        return [entry for entry in listing.entries if entry.kind == "mlserver"
                or (entry.kind == "checkpoints" and entry.status == FINISHED
                    and not entry.candidate)]
    chosen = kinds or set(KINDS)
    cutoff = time.time() - (older_than_days or 0) * _DAY
    return [entry for entry in listing.entries
            if entry.kind in chosen and (everything or not entry.protected)
            and (older_than_days is None or entry.last_used < cutoff)]


def remove_entry(entry: CacheEntry) -> None:
    """Delete one entry's folder, after checking it lies directly in the folder it was
    listed from (not reached through a link)."""
    path, root = entry.path, entry.root
    if path.is_symlink() or path.resolve().parent != root.resolve():
        raise SkinmlError(f"refusing to remove {path}: not a folder directly in {root}")
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # removed meanwhile (another prune, a finished run cleaning up)
    except OSError as exc:
        raise SkinmlError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _image_caches(root: Path) -> Iterator[CacheEntry]:
    for path in _folders(root, _IMAGE_CACHE):
        images = path / IMAGES_FILE  # its atime: when training last opened the cache
        used = images.stat().st_atime if images.is_file() else 0.0
        yield _entry("images", path, root, _image_cache_about(path), used=used)
    for path in _folders(root, _IMAGE_BUILD):
        yield _entry("images", path, root, "incomplete build", building=True)


def _image_cache_about(path: Path) -> str:
    """Size, frame and image count, from the cache's meta.json (the images stay unread)."""
    try:
        meta = cache_meta(path)
        count, height, width, _ = meta["shape"]
        return f"{meta['size']} px ({width}x{height}), {count} images"
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged (no readable meta.json; the next build replaces it)"


def _served_model(path: Path) -> str:
    """Which logged model an MLServer folder holds, from its MLmodel file."""
    try:
        mlmodel = yaml.safe_load((path / "model" / "MLmodel").read_text())
        return f"model {mlmodel['model_id']} of run {mlmodel['run_id']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "no complete model (a download was interrupted)"


def _checkpoints(root: Path) -> Iterator[CacheEntry]:
    paths = list(_folders(root, _RUN_ID))
    statuses = _run_statuses([path.name for path in paths])
    where = shown_uri()
    for path in paths:
        status = statuses[path.name]
        about = status or f"not in {where}"
        candidate = (path / CANDIDATE_FILE).is_file()
        if candidate:
            about += ", a tuning trial's weights its study logs if the trial is its best"
        yield _entry("checkpoints", path, root, about, status=status, candidate=candidate)


def _run_statuses(run_ids: list[str]) -> dict[str, str | None]:
    """Each run's status in the tracking store; None for a run it does not hold (or when
    there is no store: asking a missing SQLite store would create an empty one)."""
    try:
        require_tracking_store()
    except SkinmlError:
        return dict.fromkeys(run_ids)
    return {run_id: run_status(run_id) for run_id in run_ids}


def _folders(parent: Path, name: re.Pattern[str]) -> Iterator[Path]:
    """The real folders (not links) in `parent` whose name matches, sorted by name."""
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        if name.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            yield path


def _entry(kind: str, path: Path, root: Path, about: str, *, used: float = 0.0,
           status: str | None = None, building: bool = False,
           candidate: bool = False) -> CacheEntry:
    nbytes, newest = _size_and_mtime(path)
    return CacheEntry(kind, path, root, nbytes, max(newest, used), about, status, building,
                      candidate)


def _size_and_mtime(folder: Path) -> tuple[int, float]:
    """Bytes of the files under `folder` (links not followed) and the newest mtime there."""
    total, newest = 0, folder.lstat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                info = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue  # removed while we looked
            newest = max(newest, info.st_mtime)
            total += info.st_size if S_ISREG(info.st_mode) else 0
    return total, newest

