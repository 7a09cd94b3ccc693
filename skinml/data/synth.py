"""Synthetic HAM10000-shaped folders for scale tests and benchmarks (not for claims about skin).

Class frequencies, lesions of 1-4 images and the metadata columns follow HAM10000; each
class has its own colour, outline and texture so a model can learn to tell them apart.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from skinml.core.labels import CLASSES
from skinml.data.errors import DataError
from skinml.data.metadata import METADATA_FILE

# Images per class in HAM10000 (10,015 in all).
HAM10000_IMAGES = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113,
                   "nv": 6705, "vasc": 142}
# Lesions with 1, 2, 3, 4 images in HAM10000 (the 9 lesions with 5-6 images folded into 4).
_IMAGES_PER_LESION = np.array([5514, 1423, 490, 43]) / 7470
_MEAN_AGE = {"akiec": 67, "bcc": 67, "bkl": 64, "df": 53, "mel": 61, "nv": 46, "vasc": 51}
_LOCALIZATIONS = {"back": 2192, "lower extremity": 2077, "trunk": 1404,
                  "upper extremity": 1118, "abdomen": 1022, "face": 745, "chest": 407,
                  "foot": 319, "unknown": 234, "neck": 168, "scalp": 128, "hand": 90,
                  "ear": 56, "genital": 48, "acral": 7}
MIN_IMAGES = 3 * len(CLASSES)


@dataclass(frozen=True)
class _Look:
    """How a class is drawn: lesion colour (RGB), outline and texture."""

    colour: tuple[int, int, int]
    outline: str  # round | irregular | ring | scar | lobules
    texture: str  # smooth | speckle | lines | cracks | blotches
    radius: float  # fraction of the image height


_LOOKS = {
    "akiec": _Look((196, 96, 96), "irregular", "speckle", 0.30),
    "bcc": _Look((222, 170, 178), "ring", "lines", 0.28),
    "bkl": _Look((186, 146, 78), "round", "cracks", 0.32),
    "df": _Look((150, 92, 112), "scar", "smooth", 0.2),
    "mel": _Look((58, 36, 52), "irregular", "blotches", 0.34),
    "nv": _Look((118, 76, 44), "round", "smooth", 0.24),
    "vasc": _Look((170, 28, 64), "lobules", "smooth", 0.22),
}


def write_synthetic(out: str | Path, n: int, *, seed: int = 0, width: int = 600,
                    height: int = 450, layout: str = "flat", progress: bool = True,
                    workers: int | None = None) -> Path:
    """Write a HAM10000-shaped folder of `n` images to `out` (which must not exist or be empty).

    `layout` "parts" splits the images over HAM10000_images_part_1/ and _part_2/ as the
    dataset ships. The folder appears complete or not at all. Images are drawn in `workers`
    processes (default: one per core); each image has its own seed, so the folder is the
    same whatever the number of workers.
    """
    out = Path(out)
    if n < MIN_IMAGES:
        raise DataError(f"--n must be at least {MIN_IMAGES} (three images per class), got {n}")
    if min(width, height) < 16:
        raise DataError(f"image size must be at least 16x16 pixels, got {width}x{height}")
    if layout not in ("flat", "parts"):
        raise DataError(f"layout must be 'flat' or 'parts', got {layout!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder")
    rng = np.random.default_rng(seed)
    metadata = _metadata(n, rng)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        looks: dict[str, dict[str, float]] = {}
        jobs = []
        for row in metadata.itertuples():
            lesion = looks.setdefault(row.lesion_id, _lesion_params(row.dx, rng))
            folder = tmp
            if layout == "parts":
                folder = tmp / f"HAM10000_images_part_{1 + (row.Index >= n // 2)}"
                folder.mkdir(exist_ok=True)
            jobs.append(_Job(folder / f"{row.image_id}.jpg", row.dx, lesion, width, height,
                             (seed, row.Index)))
        for _ in tqdm(_run(jobs, workers or os.cpu_count() or 1), total=n,
                      desc="synthesizing", unit="img", disable=None if progress else True,
                      leave=False):
            pass
        metadata.to_csv(tmp / METADATA_FILE, index=False)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass(frozen=True)
class _Job:
    path: Path
    dx: str
    lesion: dict[str, float]
    width: int
    height: int
    seed: tuple[int, int]  # (folder seed, image index): the image's own random stream


def _write(job: _Job) -> None:
    image = _draw(job.dx, job.lesion, job.width, job.height, np.random.default_rng(job.seed))
    Image.fromarray(image).save(job.path, quality=90)


def _run(jobs: list[_Job], workers: int) -> Iterator[None]:
    if workers <= 1 or len(jobs) < 64:  # a pool costs more than it saves on a few images
        yield from map(_write, jobs)
        return
    # spawn: the caller may hold threads (torch), which fork would copy mid-flight.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_write, jobs, chunksize=8)


def _class_counts(n: int) -> dict[str, int]:
    """HAM10000's class frequencies scaled to n images, at least 3 per class."""
    total = sum(HAM10000_IMAGES.values())
    counts = {dx: max(3, int(n * k / total)) for dx, k in HAM10000_IMAGES.items()}
    counts["nv"] += n - sum(counts.values())  # rounding and the minimum come out of nv
    return counts


def _metadata(n: int, rng: np.random.Generator) -> pd.DataFrame:
    rows: list[dict[str, object]] = []
    locations = list(_LOCALIZATIONS)
    location_p = np.array(list(_LOCALIZATIONS.values()), dtype=float)
    location_p /= location_p.sum()
    lesions = 0
    for dx, count in _class_counts(n).items():
        made = 0
        while made < count:
            # Rare classes get single-image lesions so each has several lesions to split.
            images = 1 if count < 12 else int(rng.choice(4, p=_IMAGES_PER_LESION)) + 1
            images = min(images, count - made)
            lesion_id = f"SYNL_{lesions:07d}"
            lesions += 1
            age = float(np.clip(round(rng.normal(_MEAN_AGE[dx], 15) / 5) * 5, 0, 85))
            sex = str(rng.choice(["male", "female"], p=[0.54, 0.46]))
            place = str(rng.choice(locations, p=location_p))
            dx_type = "follow_up" if dx == "nv" and rng.random() < 0.55 else "histo"
            for _ in range(images):
                rows.append({"lesion_id": lesion_id, "image_id": f"SYN_{len(rows):07d}",
                             "dx": dx, "dx_type": dx_type, "age": age, "sex": sex,
                             "localization": place})
            made += images
    order = rng.permutation(len(rows))
    return pd.DataFrame([rows[i] for i in order])


def _lesion_params(dx: str, rng: np.random.Generator) -> dict[str, float]:
    """What stays the same across the images of one lesion."""
    look = _LOOKS[dx]
    return {"radius": look.radius * rng.uniform(0.75, 1.25), "aspect": rng.uniform(0.7, 1.0),
            "angle": rng.uniform(0, np.pi), "tint": rng.uniform(-18, 18),
            "skin": rng.uniform(-25, 20), "phase": rng.uniform(0, 2 * np.pi)}


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    small = rng.random((cells, max(2, cells * w // h))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def _draw(dx: str, lesion: dict[str, float], w: int, h: int,
          rng: np.random.Generator) -> np.ndarray:
    look = _LOOKS[dx]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.normal(0, 0.05) * w
    cy = h / 2 + rng.normal(0, 0.05) * h
    angle = lesion["angle"] + rng.normal(0, 0.2)  # another shot of the same lesion
    dx_, dy_ = (x - cx) / h, (y - cy) / h
    u = dx_ * np.cos(angle) + dy_ * np.sin(angle)
    v = (-dx_ * np.sin(angle) + dy_ * np.cos(angle)) / lesion["aspect"]
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    radius = lesion["radius"]
    if look.outline == "irregular":
        radius = radius * (1 + 0.22 * np.sin(3 * theta + lesion["phase"])
                           + 0.12 * np.sin(7 * theta + 2 * lesion["phase"]))
    inside = np.clip((radius - r) / 0.02, 0, 1)
    if look.outline == "lobules":
        inside = np.zeros_like(r)
        for k in range(4):
            a = lesion["phase"] + k * np.pi / 2
            lobe = np.hypot(u - 0.45 * radius * np.cos(a), v - 0.45 * radius * np.sin(a))
            inside = np.maximum(inside, np.clip((0.5 * radius - lobe) / 0.02, 0, 1))
    strength = inside.copy()
    if look.outline == "ring":
        strength *= 1 - 0.75 * np.clip(1 - r / (0.55 * lesion["radius"]), 0, 1)
    centre = np.clip(1 - r / (0.45 * lesion["radius"]), 0, 1) if look.outline == "scar" else 0

    texture = np.ones_like(r)
    if look.texture == "speckle":
        texture = 0.7 + 0.6 * (rng.random((h, w)) > 0.5)
    elif look.texture == "lines":
        texture = 0.75 + 0.5 * (np.sin(u * 90 + lesion["phase"]) > 0.6)
    elif look.texture == "cracks":
        texture = 0.75 + 0.5 * ((np.sin(u * 60) * np.sin(v * 60)) > 0.3)
    elif look.texture == "blotches":
        texture = 0.4 + 1.4 * _smooth_noise(h, w, 6, rng)

    skin = np.array([224, 172, 150], dtype=np.float32) + lesion["skin"]
    colour = np.clip(np.array(look.colour, dtype=np.float32) + lesion["tint"], 0, 255)
    lesion_rgb = colour[None, None, :] * texture[..., None]
    image = skin * (1 - strength[..., None]) + lesion_rgb * strength[..., None]
    image = image * (1 - np.asarray(centre)[..., None]) + 245 * np.asarray(centre)[..., None]
    # Dermoscopes leave dark corners; a little noise stands in for skin texture.
    vignette = np.clip(1.25 - np.hypot((x - w / 2) / (0.6 * w), (y - h / 2) / (0.6 * h)), 0, 1)
    image = image * (0.35 + 0.65 * vignette[..., None]) * rng.uniform(0.85, 1.15)
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
