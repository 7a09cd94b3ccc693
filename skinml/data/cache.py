"""The decode-once cache: every image decoded and resized once, kept as one uint8 memmap.

Decoding 600x450 JPEGs every epoch starves a GPU. `prepare_cache` stores all images of a
data set as one (N, H, W, 3) array in `images.npy` beside a `meta.json`, under a folder
named by a digest of the image list (ids, paths, file sizes and mtimes) and the size, so a
changed data set gets a new cache and an unchanged one is reused. A cache is built in a
temporary folder and renamed into place only when complete: an interrupted build never
leaves anything a later run would take for a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from skinml.data.decode import decode_to_frame, frame_for, image_size, map_images
from skinml.data.errors import CorruptImageError, DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_SIZE = 256
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"
BUILD_PREFIX = ".tmp-"  # a build in progress: BUILD_PREFIX + key + -host-pid
KEY_DIGITS = 20  # a cache folder's name: this many hex digits of `cache_key`


@dataclass(frozen=True)
class ImageCache:
    """A complete cache: `images[i]` is the (H, W, 3) uint8 image of `image_ids[i]`."""

    path: Path
    images: np.ndarray  # read-only memmap; rows are never copied into RAM wholesale
    image_ids: tuple[str, ...]
    skipped: tuple[str, ...]  # ids left out as corrupt (their rows are zeros)
    size: int
    reused: bool

    def rows(self, image_ids: pd.Series | list[str]) -> np.ndarray:
        """Row numbers of these image ids in `images`."""
        index = {image_id: row for row, image_id in enumerate(self.image_ids)}
        absent = [i for i in image_ids if i not in index or i in self.skipped]
        if absent:
            raise DataError(f"image cache {self.path} has no image {absent[0]} "
                            f"({len(absent)} missing); run `skinml data prepare` again")
        return np.fromiter((index[i] for i in image_ids), dtype=np.int64,
                           count=len(image_ids))

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def cache_root() -> Path:
    """`$SKINML_CACHE`, else `~/.cache/skinml`."""
    return Path(os.environ.get("SKINML_CACHE") or Path.home() / ".cache" / "skinml")


def cache_key(df: pd.DataFrame, size: int) -> str:
    """Digest of what the cache content depends on: the image files and the size."""
    digest = hashlib.sha256(f"skinml-cache/{CACHE_FORMAT}/{size}\n".encode())
    for image_id, path in sorted(zip(df["image_id"], df["path"], strict=True)):
        stat = os.stat(path)
        digest.update(f"{image_id}\t{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:KEY_DIGITS]


def prepare_cache(df: pd.DataFrame, *, size: int = DEFAULT_SIZE, root: Path | None = None,
                  skip_corrupt: bool = False, workers: int | None = None,
                  progress: bool = True) -> ImageCache:
    """Return the cache for the images in `df`, building it if no complete one exists."""
    if size < 8:
        raise DataError(f"cache size must be at least 8 pixels, got {size}")
    if len(df) == 0:
        raise DataError("no images to cache")
    root = Path(root) if root is not None else cache_root()
    final = root / cache_key(df, size)
    cache = _open_existing(final)
    if cache is None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(root)
        cache = _build(df, final, size, skip_corrupt, workers, progress)
    if cache.skipped:
        if not skip_corrupt:
            raise CorruptImageError(f"image {cache.skipped[0]} cannot be decoded "
                                    f"({len(cache.skipped)} in all, left out of {cache.path}); "
                                    "pass --skip-corrupt to train without them")
        log.warning("%d corrupt image(s) left out of the cache (first: %s)",
                    len(cache.skipped), cache.skipped[0])
    return cache


def open_cache(path: Path) -> ImageCache:
    """Open a complete cache folder read-only; DataError if it is not one."""
    cache = _open_existing(Path(path))
    if cache is None:
        raise DataError(f"{path} is not a complete skinml image cache")
    return cache


def cache_meta(path: Path) -> dict:
    """A cache folder's meta.json: format, size, shape, image ids, skipped images."""
    return json.loads((path / META_FILE).read_text())


def _open_existing(path: Path) -> ImageCache | None:
    if not (path / META_FILE).is_file():
        return None
    try:
        meta = cache_meta(path)
        images = np.load(path / IMAGES_FILE, mmap_mode="r")
        complete = (meta["format"] == CACHE_FORMAT and list(images.shape) == meta["shape"]
                    and len(meta["image_ids"]) == images.shape[0])
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        log.warning("image cache %s is damaged; rebuilding it", path)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return ImageCache(path, images, tuple(meta["image_ids"]), tuple(meta["skipped"]),
                      meta["size"], reused=True)


def _build(df: pd.DataFrame, final: Path, size: int, skip_corrupt: bool,
           workers: int | None, progress: bool) -> ImageCache:
    ordered = df.sort_values("image_id", kind="stable")
    image_ids = ordered["image_id"].tolist()
    paths = ordered["path"].tolist()
    height, width = _common_frame(paths, size, skip_corrupt)
    tmp = final.parent / f"{BUILD_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        images = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), height, width, 3))

        def decode(row: int) -> str | None:
            try:
                images[row] = decode_to_frame(paths[row], height, width)
            except CorruptImageError as exc:
                if not skip_corrupt:
                    raise
                log.warning("%s", exc)
                return image_ids[row]
            return None

        skipped = [i for i in map_images(decode, len(paths), workers=workers,
                                         desc="caching", progress=progress) if i]
        images.flush()
        meta = {"format": CACHE_FORMAT, "size": size, "shape": [len(paths), height, width, 3],
                "image_ids": image_ids, "skipped": skipped,
                "created": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_durably(tmp / META_FILE, json.dumps(meta))
        try:
            os.rename(tmp, final)
        except OSError:
            if _open_existing(final) is None:  # not a concurrent builder's finished cache
                raise
            log.info("another process finished %s first; using it", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = open_cache(final)
    return ImageCache(cache.path, cache.images, cache.image_ids, cache.skipped, cache.size,
                      reused=False)


def _common_frame(paths: list[str], size: int, skip_corrupt: bool) -> tuple[int, int]:
    """The (height, width) of the most common aspect ratio, shorter side `size`.

    HAM10000 images are all 4:3; other shapes are resized to cover this frame and centre-
    cropped, the same geometry the served model applies to its input.
    """
    shapes: Counter[tuple[int, int]] = Counter()
    for path in paths:
        try:
            shapes[frame_for(*image_size(path), size)] += 1
        except CorruptImageError:
            if not skip_corrupt:
                raise
    if not shapes:
        raise CorruptImageError(f"none of the {len(paths)} images can be decoded")
    return shapes.most_common(1)[0][0]


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _remove_abandoned_builds(root: Path) -> None:
    """Delete temporary folders left by killed builds on this host (their PID is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f"{BUILD_PREFIX}*"):
        tmp_host, _, pid = tmp.name.rpartition("-")
        if not (pid.isdigit() and tmp_host.endswith(f"-{host}")):
            continue
        if not _process_alive(int(pid)):
            log.info("removing abandoned cache build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
