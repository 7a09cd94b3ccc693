"""Read a HAM10000 folder: the metadata CSV at its root and the images anywhere below it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinml.core.errors import first_line
from skinml.core.labels import CLASS_INDEX, CLASSES
from skinml.data.errors import (
    DataDirNotFoundError,
    DuplicateImageIdError,
    MetadataFormatError,
    MetadataNotFoundError,
    MissingImagesError,
    NoImagesError,
    UnknownDiagnosisError,
)

log = logging.getLogger(__name__)

METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
# Columns HAM10000 ships that a user-made folder may lack; filled so every frame looks alike.
OPTIONAL_COLUMNS = {"dx_type": "unknown", "age": float("nan"), "sex": "unknown",
                    "localization": "unknown"}
COLUMNS = ("image_id", "lesion_id", "dx", "label", "path", "dx_type", "age", "sex",
           "localization")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_FIRST_FEW = 3


def default_data_dir() -> Path:
    """The bundled 660-image HAM10000 sample, used wherever no folder is given."""
    return Path(__file__).resolve().parent.parent / "sample"


@dataclass(frozen=True)
class FolderScan:
    """What a HAM10000 folder holds before missing images are dealt with."""

    root: Path
    metadata: pd.DataFrame  # validated metadata rows, in file order
    image_files: dict[str, Path]  # image_id (file stem) -> file
    missing: tuple[str, ...]  # image_ids listed in the metadata without a file
    unlisted: tuple[Path, ...]  # image files without a metadata row


def scan_folder(data_dir: str | os.PathLike) -> FolderScan:
    """Validate the metadata of `data_dir` and match its rows to image files."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataDirNotFoundError(f"data folder {root} does not exist or is not a folder")
    root = root.resolve()
    metadata = read_metadata(root / METADATA_FILE)
    image_files = find_images(root)
    if not image_files:
        suffixes = "/".join(sorted(IMAGE_SUFFIXES))
        raise NoImagesError(f"no {suffixes} images found in {root} or its subfolders")
    listed = set(metadata["image_id"])
    missing = tuple(i for i in metadata["image_id"] if i not in image_files)
    unlisted = tuple(p for i, p in image_files.items() if i not in listed)
    return FolderScan(root, metadata, image_files, missing, unlisted)


def load_ham10000(data_dir: str | os.PathLike | None = None, *,
                  allow_missing: bool = False) -> pd.DataFrame:
    """One row per image: image_id, lesion_id, dx, label, path, dx_type, age, sex, localization.

    Rows whose image is missing are an error unless `allow_missing`, which drops them.
    """
    return frame_from_scan(scan_folder(default_data_dir() if data_dir is None else data_dir),
                           allow_missing=allow_missing)


def frame_from_scan(scan: FolderScan, *, allow_missing: bool = False) -> pd.DataFrame:
    """The load_ham10000 frame of an already scanned folder."""
    metadata = scan.metadata
    if scan.missing:
        where = f"{scan.root / METADATA_FILE}: {len(scan.missing)} of {len(metadata)} rows"
        first = ", ".join(scan.missing[:_FIRST_FEW])
        if len(scan.missing) == len(metadata):
            raise MissingImagesError(f"{where} have no image file under {scan.root} "
                                     f"(first: {first})")
        if not allow_missing:
            raise MissingImagesError(f"{where} have no image file under {scan.root} "
                                     f"(first: {first}); pass --allow-missing to drop them")
        log.warning("dropped %s without an image file (first: %s)", where, first)
        metadata = metadata[~metadata["image_id"].isin(set(scan.missing))]
    if scan.unlisted:
        log.warning("ignored %d image files in %s with no metadata row (first: %s)",
                    len(scan.unlisted), scan.root,
                    ", ".join(p.name for p in scan.unlisted[:_FIRST_FEW]))
    frame = metadata.assign(
        label=metadata["dx"].map(CLASS_INDEX).astype("int64"),
        path=metadata["image_id"].map(lambda i: str(scan.image_files[i])),
    )
    return frame.loc[:, list(COLUMNS)].reset_index(drop=True)


def read_metadata(path: Path) -> pd.DataFrame:
    """Parse and validate a HAM10000 metadata CSV; errors name the file, line and field."""
    if not path.is_file():
        raise MetadataNotFoundError(f"{path.parent} has no metadata file {path.name} at its root")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = first_line(exc)
        raise MetadataFormatError(f"{path}: cannot be read as CSV ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if absent:
        raise MetadataFormatError(f"{path}: missing required column(s) {', '.join(absent)} "
                                  f"(found: {', '.join(frame.columns) or 'none'})")
    frame = frame.apply(lambda column: column.str.strip())
    for column in REQUIRED_COLUMNS:
        _require_values(frame, column, path)
    frame["dx"] = frame["dx"].str.lower()
    _require_known_dx(frame, path)
    _require_unique_ids(frame, path)
    for column, fill in OPTIONAL_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = fill
    frame["age"] = _parse_age(frame["age"], path)
    text_columns = [c for c in OPTIONAL_COLUMNS if c != "age"]
    frame[text_columns] = frame[text_columns].replace("", "unknown")
    return frame


def find_images(root: Path) -> dict[str, Path]:
    """Map image_id (file stem) to the first image file found below `root`, in sorted order.

    Downloads often hold the same image twice (Kaggle ships both `HAM10000_images_part_1/`
    and `ham10000_images_part_1/`); the first copy wins and the rest are counted.
    """
    found: dict[str, Path] = {}
    copies = 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
                continue
            if path.stem in found:
                copies += 1
            else:
                found[path.stem] = path
    if copies:
        log.info("%s: %d duplicate image files ignored (first copy of each kept)", root, copies)
    return found


def _line(index: int) -> int:
    return index + 2  # header is line 1; pandas indexes from 0


def _require_values(frame: pd.DataFrame, column: str, path: Path) -> None:
    empty = frame.index[frame[column] == ""]
    if len(empty):
        raise MetadataFormatError(f"{path}: column {column} is empty on line {_line(empty[0])}"
                                  f" ({len(empty)} rows in all)")


def _require_known_dx(frame: pd.DataFrame, path: Path) -> None:
    unknown = frame.index[~frame["dx"].isin(CLASSES)]
    if len(unknown):
        first = unknown[0]
        raise UnknownDiagnosisError(
            f"{path}: line {_line(first)} has dx {frame.at[first, 'dx']!r}, not one of "
            f"{', '.join(CLASSES)} ({len(unknown)} rows in all)")


def _require_unique_ids(frame: pd.DataFrame, path: Path) -> None:
    repeated = frame["image_id"].duplicated(keep=False)
    if repeated.any():
        image_id = frame.loc[repeated, "image_id"].iloc[0]
        lines = [_line(i) for i in frame.index[frame["image_id"] == image_id]]
        n_ids = frame.loc[repeated, "image_id"].nunique()
        raise DuplicateImageIdError(
            f"{path}: image_id {image_id} appears on lines {', '.join(map(str, lines))} "
            f"({n_ids} duplicated image_id(s) in all)")


def _parse_age(ages: pd.Series, path: Path) -> pd.Series:
    parsed = pd.to_numeric(ages.replace("", None), errors="coerce").astype("float64")
    bad = ages.index[parsed.isna() & ~ages.isin(["", "unknown", "nan", "NaN"]) & ages.notna()]
    if len(bad):
        raise MetadataFormatError(f"{path}: column age has non-numeric value "
                                  f"{ages[bad[0]]!r} on line {_line(bad[0])}")
    return parsed
