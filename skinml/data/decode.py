"""Decode image files to RGB and fit them to a fixed frame, in parallel with progress."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from skinml.data.errors import CorruptImageError

T = TypeVar("T")

# Reading an image can fail in many ways (bad header, truncated data, bad marker).
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError,
                  Image.DecompressionBombError)


def frame_for(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of an image of this aspect ratio with its shorter side at `size`."""
    if width >= height:
        return size, max(size, round(size * width / height))
    return max(size, round(size * height / width)), size


def open_rgb(path: str | os.PathLike | BinaryIO, draft_to: tuple[int, int] | None = None,
             max_pixels: int | None = None) -> Image.Image:
    """Decode an image completely as RGB; `draft_to` (w, h) lets JPEG decode at reduced scale.

    `max_pixels` refuses larger images before decoding them (a decompression-bomb guard).
    """
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise CorruptImageError(f"{_name(path)}: image of {image.width}x{image.height} "
                                        f"pixels is over the limit of {max_pixels:,} pixels")
            if draft_to is not None and image.format == "JPEG":
                image.draft("RGB", draft_to)
            image.load()
            return image.convert("RGB")
    except DECODE_ERRORS as exc:
        raise CorruptImageError(f"{_name(path)}: cannot decode image ({_reason(exc)})") from None


def _name(path: str | os.PathLike | BinaryIO) -> str:
    return "image" if hasattr(path, "read") else str(path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except DECODE_ERRORS as exc:
        raise CorruptImageError(f"{path}: cannot decode image ({_reason(exc)})") from None


def frame_geometry(image_width: int, image_height: int, height: int, width: int
                   ) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, left, top): the resize that covers height x width, then the
    centre crop's corner (shared by the CPU path and the GPU JPEG path)."""
    scale = max(height / image_height, width / image_width)
    resized_w = max(width, round(image_width * scale))
    resized_h = max(height, round(image_height * scale))
    return resized_w, resized_h, (resized_w - width) // 2, (resized_h - height) // 2


def fit_to_frame(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so the image covers height x width, then centre-crop: the cache's geometry."""
    resized_w, resized_h, left, top = frame_geometry(image.width, image.height, height, width)
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
    return image.crop((left, top, left + width, top + height))


def decode_to_frame(source: str | os.PathLike | BinaryIO, height: int, width: int,
                    max_pixels: int | None = None) -> np.ndarray:
    """One image as the (height, width, 3) uint8 pixels every path feeds the network: the
    training cache, the served model and `skinml predict` all call this, so their pixels are
    identical. JPEGs decode at reduced DCT scale (draft) down to twice the frame: fast, and
    the bilinear resize then smooths."""
    image = open_rgb(source, draft_to=(2 * width, 2 * height), max_pixels=max_pixels)
    return np.asarray(fit_to_frame(image, height, width))


def map_images(work: Callable[[int], T], count: int, *, workers: int | None = None,
               desc: str = "decoding", progress: bool = True) -> Iterator[T]:
    """Run `work(i)` for i in range(count) on a thread pool, yielding results in order.

    Pillow releases the GIL while decoding and resizing, so threads scale with cores.
    Stopping early (an error, Ctrl-C) cancels the work not yet started.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield from tqdm(pool.map(work, range(count)), total=count, desc=desc, unit="img",
                        disable=None if progress else True, leave=False)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def find_corrupt(paths: Sequence[Path], *, workers: int | None = None,
                 progress: bool = True) -> list[str]:
    """Decode every image fully; return one message per file that cannot be decoded."""

    def check(i: int) -> str | None:
        try:
            open_rgb(paths[i])
        except CorruptImageError as exc:
            return str(exc)
        return None

    results = map_images(check, len(paths), workers=workers, desc="checking",
                         progress=progress)
    return [message for message in results if message is not None]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a JPEG, PNG or other known image format"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
