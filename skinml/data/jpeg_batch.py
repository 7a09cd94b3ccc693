"""Frames for a batch of encoded images: the JPEGs decoded together by torchvision (nvjpeg on
CUDA) and fitted to the frame on the device, every other row by `decode_to_frame` on the CPU.

The device path reproduces `decode_to_frame`'s pixels within a few uint8 levels: PIL's
JPEG `draft` (a DCT-scaled decode at 1/2, 1/4 or 1/8) is emulated by a box average over the
full decode, then the same cover-the-frame resize (antialiased bilinear, which is PIL's
BILINEAR) and centre crop from `frame_geometry`. tests/data/test_jpeg_batch.py states the
measured differences.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from skinml.data.decode import DECODE_ERRORS, decode_to_frame, frame_geometry, map_images
from skinml.data.errors import CorruptImageError

_END_OF_IMAGE = b"\xff\xd9"
# Colour modes whose conversion to RGB torchvision and nvjpeg do as PIL does (CMYK/YCCK
# JPEGs, rare, keep PIL's conversion).
_DEVICE_MODES = ("RGB", "L")


@dataclass(frozen=True)
class FrameBatch:
    """Fitted frames of a batch in row order: `pixels` (rows, height, width, 3) uint8 on the
    device; `cpu_rows` the rows `decode_to_frame` made (not a JPEG, over the pixel limit,
    not ending in the EOI marker, CMYK, or refused by the device decoder)."""

    pixels: torch.Tensor
    cpu_rows: tuple[int, ...]


class CorruptRowError(CorruptImageError):
    """Row `row` of a batch cannot be decoded; the message is `decode_to_frame`'s."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def decode_batch(raws: Sequence[bytes], height: int, width: int,
                 device: str | torch.device, max_pixels: int | None = None) -> FrameBatch:
    """Encoded images as one (rows, height, width, 3) uint8 tensor on `device`.

    JPEGs go through one batched `decode_jpeg` call and are resized in one call per source
    size; the other rows fall back to `decode_to_frame`, so they hold the training pixels
    exactly. A row that cannot be decoded at all raises CorruptRowError: the first such
    row in order, as decoding them one by one would.
    """
    device = torch.device(device)
    pixels = torch.empty((len(raws), height, width, 3), dtype=torch.uint8, device=device)
    jpeg_rows = [row for row, raw in enumerate(raws) if _suits_device(raw, max_pixels)]
    images = _decode_jpegs([raws[row] for row in jpeg_rows], device)
    decoded = {row: image for row, image in zip(jpeg_rows, images, strict=True)
               if image is not None}
    for rows, frames in _fit_by_size(decoded, height, width):
        pixels[rows] = frames
    cpu_rows = [row for row in range(len(raws)) if row not in decoded]
    if cpu_rows:
        pixels[cpu_rows] = _upload(_decode_on_cpu(raws, cpu_rows, height, width, max_pixels),
                                   device)
    return FrameBatch(pixels, tuple(cpu_rows))


def _suits_device(raw: bytes, max_pixels: int | None) -> bool:
    """Whether the header says a complete RGB or greyscale JPEG within the pixel limit
    (not MPO: `decode_to_frame` decodes those without draft).

    A truncated JPEG lacks the final EOI marker: PIL refuses it, while nvjpeg may decode it
    without complaint, so it goes to the CPU path and raises there as in training.
    """
    if not raw.rstrip(b"\0").endswith(_END_OF_IMAGE):
        return False
    try:
        with Image.open(io.BytesIO(raw), formats=("JPEG",)) as image:  # reads the header only
            return (image.format == "JPEG" and image.mode in _DEVICE_MODES
                    and (max_pixels is None or image.width * image.height <= max_pixels))
    except DECODE_ERRORS:
        return False


def _decode_jpegs(raws: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 images on `device`, None for the rows the decoder refuses."""
    if not raws:
        return []
    # bytearray: torch.frombuffer warns on the read-only buffer of bytes
    data = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in raws]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # the batched call returns nothing when one row fails: find it
        return [_decode_jpeg_alone(one, device) for one in data]


def _decode_jpeg_alone(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _fit_by_size(images: dict[int, torch.Tensor], height: int, width: int
                 ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, their (n, height, width, 3) frames) for each source size: one resize per size
    (a HAM10000 batch, all 600x450, is one)."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for row, image in images.items():
        by_size[tuple(image.shape)].append(row)
    for rows in by_size.values():
        yield rows, _fit(torch.stack([images[row] for row in rows]), height, width)


def _fit(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 3, h, w) full-scale decodes as `decode_to_frame` fits them: (n, height, width, 3)."""
    scale = _draft_scale(images.shape[-1], images.shape[-2], height, width)
    if scale > 1:
        # libjpeg's DCT scaling is close to a box average (a partial box at the edges)
        images = F.avg_pool2d(images.float(), scale, ceil_mode=True).round_().to(torch.uint8)
    image_h, image_w = images.shape[-2:]
    resized_w, resized_h, left, top = frame_geometry(image_w, image_h, height, width)
    if (resized_w, resized_h) != (image_w, image_h):
        images = TF.resize(images, [resized_h, resized_w], antialias=True)
    return images[..., top:top + height, left:left + width].permute(0, 2, 3, 1)


def _draft_scale(image_w: int, image_h: int, height: int, width: int) -> int:
    """The DCT scale PIL's `draft` picks when `decode_to_frame` asks for twice the frame:
    the largest of 8, 4, 2 at which both sides stay at least twice the frame's, else 1."""
    fits = min(image_w // (2 * width), image_h // (2 * height))
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _decode_on_cpu(raws: Sequence[bytes], rows: list[int], height: int, width: int,
                   max_pixels: int | None) -> np.ndarray:
    """`decode_to_frame` of `rows` on a thread pool; the first bad row raises CorruptRowError."""

    def decode(i: int) -> np.ndarray:
        try:
            return decode_to_frame(io.BytesIO(raws[rows[i]]), height, width, max_pixels)
        except CorruptImageError as exc:
            raise CorruptRowError(rows[i], str(exc)) from None

    return np.stack(list(map_images(decode, len(rows), progress=False)))


def _upload(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    cpu = torch.from_numpy(frames)
    if device.type == "cuda":
        cpu = cpu.pin_memory()  # pinned, the copy runs asynchronously with the host
    return cpu.to(device, non_blocking=True)
