"""`skinml predict --out`: image files of any number streamed through a logged model into
parts that a killed run resumes without a duplicate or a lost row.

The output folder holds `predictions/part-NNNNNN.csv|parquet` (one per `part_size` input
files, in input order), `errors.csv` (path, error: files that could not be read or decoded)
and `manifest.json`. A part is written and synced, its errors appended and synced, then the
manifest records it: the manifest is the commit. A resumed run drops whatever came after
the last commit (a part file, a tail of errors.csv), checks that the inputs before it are
the same files in the same order (a digest of their paths) and the same model, and goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from skinml.core.errors import SkinmlError, first_line
from skinml.core.files import replaced_atomically
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data.image_files import ImageSources
from skinml.inference.requests import BadInput, encode_image
from skinml.tracking.logged_model import (
    isic_submission,
    load_model,
    model_identity,
    note_images_alone,
)

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
MANIFEST, ERRORS, PARTS = "manifest.json", "errors.csv", "predictions"
MANIFEST_FORMAT = 1
FILE_CHUNK = 256  # files read ahead and sent to the model in one predict call
_ERRORS_HEADER = "path,error\n"


@dataclass(frozen=True)
class ScoreOptions:
    model_uri: str
    sources: ImageSources
    out: Path
    fmt: str = "csv"
    tta: bool = False
    part_size: int = 2048
    resume: bool = False
    isic_csv: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class ScoreResult:
    out: Path
    images: int  # predicted, over all runs into `out`
    errors: int
    parts: int
    resumed_at: int  # input files already done when this run started
    seconds: float  # this run's

    @property
    def per_second(self) -> float:
        return (self.images + self.errors - self.resumed_at) / max(self.seconds, 1e-9)


@dataclass
class _Progress:
    """What manifest.json records after each committed part."""

    parts: int = 0
    inputs: int = 0  # input files consumed: predicted + errors
    images: int = 0
    errors: int = 0
    errors_bytes: int = len(_ERRORS_HEADER)
    digest: str = hashlib.sha256().hexdigest()  # of the consumed inputs' paths
    complete: bool = False


def score_files(options: ScoreOptions) -> ScoreResult:
    """Predict every input file into `options.out` (see the module's docstring)."""
    if options.fmt not in FORMATS:
        raise SkinmlError(f"--format {options.fmt}: choose one of {', '.join(FORMATS)}")
    model = load_model(options.model_uri)
    note_images_alone(model, options.model_uri)
    identity = {"format": MANIFEST_FORMAT, "model_uri": options.model_uri,
                "model": model_identity(model), "sources": options.sources.describe(),
                "output_format": options.fmt, "tta": options.tta,
                "part_size": options.part_size}
    progress = _open_output(options, identity)
    started = time.perf_counter()
    paths = options.sources.paths()
    digest = _skip_done(paths, progress, options.out)
    resumed_at = progress.inputs
    bar = tqdm(desc="predicting", unit="img", initial=resumed_at,
               disable=None if options.progress else True, leave=False)
    try:
        while not progress.complete:
            part = list(itertools.islice(paths, options.part_size))
            if not part:
                progress.complete = True
                _write_manifest(options.out, identity, progress)
                break
            table, errors = _score_part(model, part, options.tta, bar)
            digest.update("".join(f"{path}\n" for path in part).encode())
            _commit(options, identity, progress, table, errors, digest.hexdigest())
            if bar.disable:
                log.info("part %d: %d files done (%d errors), %.1f images/s", progress.parts,
                         progress.inputs, progress.errors,
                         (progress.inputs - resumed_at) / (time.perf_counter() - started))
    finally:
        bar.close()
    if options.isic_csv is not None:
        _write_isic(options.out, options.fmt, options.isic_csv)
    return ScoreResult(options.out, progress.images, progress.errors, progress.parts,
                       resumed_at, time.perf_counter() - started)


def _open_output(options: ScoreOptions, identity: dict[str, Any]) -> _Progress:
    out = options.out
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        if options.resume:
            raise SkinmlError(f"--resume: {out} holds no skinml predictions to continue")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SkinmlError(f"--out {out}: not an empty folder, and it holds no skinml "
                              "predictions; choose a new or empty folder")
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        _write_durably(out / ERRORS, _ERRORS_HEADER, mode="w")
        progress = _Progress()
        _write_manifest(out, identity, progress)
        return progress
    try:
        manifest = json.loads(manifest_path.read_text())
        progress = _Progress(**manifest["progress"])
        written_with = manifest["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SkinmlError(f"{manifest_path}: not a skinml predictions manifest") from None
    if not options.resume:
        state = "complete" if progress.complete else "not complete"
        raise SkinmlError(f"--out {out} holds predictions of an earlier run ({progress.inputs} "
                          f"files, {state}): pass --resume to continue it, or choose another "
                          "folder")
    for key, value in identity.items():
        if written_with.get(key) != value:
            raise SkinmlError(f"--resume: {out} was written with {_SHOWN[key]} "
                              f"{_shown(written_with.get(key))}, not {_shown(value)}; resume "
                              "with the same model, inputs and options, or choose another "
                              "folder")
    _drop_uncommitted(out, options.fmt, progress)
    return progress


# How each manifest field is named to the user (the options of `skinml predict`).
_SHOWN = {"format": "manifest format", "model_uri": "model URI",
          "model": "the model (the URI now names another)", "sources": "inputs",
          "output_format": "--format", "tta": "--tta", "part_size": "--part-size"}


def _shown(value: Any) -> str:
    if isinstance(value, dict):  # sources
        return " ".join([*value.get("items", []), *(f"--list {f}" for f in value.get("lists", []))])
    return str(value)


def _drop_uncommitted(out: Path, fmt: str, progress: _Progress) -> None:
    """Remove what a killed run wrote after its last commit."""
    for path in _part_files(out, fmt, committed=None):
        if _part_number(path) >= progress.parts:
            path.unlink()
    for leftover in (out / PARTS).glob(".*.tmp"):
        leftover.unlink()
    with open(out / ERRORS, "r+b") as errors:
        errors.truncate(progress.errors_bytes)


def _skip_done(paths: Iterator[str], progress: _Progress, out: Path) -> Any:
    """Consume the inputs already done; their digest must match the manifest's."""
    digest = hashlib.sha256()
    done = list(itertools.islice(paths, progress.inputs)) if progress.inputs else []
    digest.update("".join(f"{path}\n" for path in done).encode())
    if len(done) != progress.inputs or digest.hexdigest() != progress.digest:
        raise SkinmlError(f"--resume: the input files are not those of the run that wrote "
                          f"{out} (its first {progress.inputs} files differ: added, removed or "
                          "renamed); score the changed inputs into another folder")
    return digest


def _score_part(model, part: list[str], tta: bool, bar: tqdm
                ) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
    """Predictions of the readable files of `part` and (index, path, reason) of the rest;
    the next chunk of files is read while the model predicts the current one."""
    tables: list[pd.DataFrame] = []
    errors: list[tuple[int, str, str]] = []
    chunks = [range(start, min(start + FILE_CHUNK, len(part)))
              for start in range(0, len(part), FILE_CHUNK)]
    with ThreadPoolExecutor(1, thread_name_prefix="skinml-read") as reader:
        ahead = reader.submit(_read, part, chunks[0])
        for k in range(len(chunks)):
            files = ahead.result()
            if k + 1 < len(chunks):
                ahead = reader.submit(_read, part, chunks[k + 1])
            table, failed = _predict_chunk(model, part, files, tta)
            tables.append(table)
            errors.extend((index, part[index], reason) for index, reason in failed)
            bar.update(len(files))
    table = pd.concat(tables, ignore_index=True)
    return table, sorted(errors)


def _read(part: list[str], indices: range) -> list[tuple[int, bytes | str]]:
    """(index, file bytes), or (index, the reason it cannot be read)."""
    files: list[tuple[int, bytes | str]] = []
    for index in indices:
        try:
            raw = Path(part[index]).read_bytes()
        except OSError as exc:
            files.append((index, f"cannot read the file ({exc.strerror or first_line(exc)})"))
            continue
        files.append((index, raw if raw else "empty file"))
    return files


def _predict_chunk(model, part: list[str], files: list[tuple[int, bytes | str]], tta: bool
                   ) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """One predict call for the readable files; a file the model refuses is set aside with
    its reason and the call repeated without it (so one bad file never stops the run)."""
    good = [(index, raw) for index, raw in files if isinstance(raw, bytes)]
    failed = [(index, raw) for index, raw in files if isinstance(raw, str)]
    while good:
        frame = pd.DataFrame({"image": [encode_image(raw) for _, raw in good]})
        try:
            table = model.predict(frame, params={"tta": tta})
        except BadInput as exc:
            if exc.row is None:
                raise
            index, _ = good.pop(exc.row)
            failed.append((index, exc.reason.removeprefix("image: ")))
            continue
        paths = [part[index] for index, _ in good]
        table.insert(0, "image", [Path(path).stem for path in paths])
        table.insert(0, "path", paths)
        return table, failed
    return _empty_table(), failed


def _empty_table() -> pd.DataFrame:
    columns = ["path", "image", "label", "diagnosis", "confidence", *PROBABILITY_COLUMNS]
    table = pd.DataFrame({column: pd.Series(dtype=object) for column in columns[:4]})
    for column in columns[4:]:
        table[column] = pd.Series(dtype="float64")
    return table


def _commit(options: ScoreOptions, identity: dict[str, Any], progress: _Progress,
            table: pd.DataFrame, errors: list[tuple[int, str, str]], digest: str) -> None:
    out = options.out
    part = out / PARTS / f"part-{progress.parts:06d}.{options.fmt}"
    with replaced_atomically(part) as tmp:
        if options.fmt == "csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
        _sync(tmp)
    if errors:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(
            (path, reason) for _, path, reason in errors)
        _write_durably(out / ERRORS, buffer.getvalue(), mode="a")
    progress.parts += 1
    progress.inputs += len(table) + len(errors)
    progress.images += len(table)
    progress.errors += len(errors)
    progress.errors_bytes = (out / ERRORS).stat().st_size
    progress.digest = digest
    _write_manifest(out, identity, progress)


def _write_manifest(out: Path, identity: dict[str, Any], progress: _Progress) -> None:
    text = json.dumps({"identity": identity, "progress": asdict(progress)}, indent=2)
    with replaced_atomically(out / MANIFEST) as tmp:
        tmp.write_text(text)
        _sync(tmp)


def _write_isic(out: Path, fmt: str, target: Path) -> None:
    """The ISIC 2018 Task 3 CSV of every part, streamed into one file."""
    with replaced_atomically(target) as tmp, open(tmp, "w") as handle:
        header = True
        for path in _part_files(out, fmt):
            table = _read_part(path).set_index("image")
            isic_submission(table).to_csv(handle, index=False, header=header)
            header = False
        if header:  # no image could be read: the header alone
            isic_submission(_empty_table().set_index("image")).to_csv(handle, index=False)


def _part_files(out: Path, fmt: str, committed: bool | None = True) -> list[Path]:
    files = sorted((out / PARTS).glob(f"part-*.{fmt}"))
    if committed:
        manifest = json.loads((out / MANIFEST).read_text())
        files = [path for path in files if _part_number(path) < manifest["progress"]["parts"]]
    return files


def _part_number(path: Path) -> int:
    return int(path.stem.removeprefix("part-"))


def _read_part(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"path": str, "image": str})
    return pd.read_parquet(path)


def _write_durably(path: Path, text: str, mode: str) -> None:
    with open(path, mode) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
