"""Loading HAM10000 folders: both layouts and every bad-folder error, via API and CLI."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from skinml.core.labels import CLASS_INDEX, CLASSES
from skinml.data import (
    DataDirNotFoundError,
    DuplicateImageIdError,
    MetadataFormatError,
    MetadataNotFoundError,
    MissingImagesError,
    NoImagesError,
    UnknownDiagnosisError,
    load_ham10000,
)
from skinml.data.metadata import COLUMNS, METADATA_FILE

from ..conftest import skinml_in_process


@pytest.mark.parametrize("layout", ["flat", "parts"])
def test_load_reads_both_layouts(make_folder, layout):
    root = make_folder(layout=layout)
    frame = load_ham10000(root)
    metadata = pd.read_csv(root / METADATA_FILE)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["image_id"].tolist() == metadata["image_id"].tolist()
    assert set(frame["dx"]) == set(CLASSES)
    assert (frame["label"] == frame["dx"].map(CLASS_INDEX)).all()
    assert frame["label"].dtype == "int64"
    assert all(Path(p).is_file() and Path(p).stem == i
               for p, i in zip(frame["path"], frame["image_id"], strict=True))
    if layout == "parts":
        assert {Path(p).parent.name for p in frame["path"]} == {
            "HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_load_without_argument_reads_the_bundled_sample():
    frame = load_ham10000()
    assert len(frame) == 660
    assert frame["lesion_id"].nunique() == 450
    assert frame["dx"].value_counts()["nv"] == 250


def test_optional_columns_are_filled(make_folder):
    root = make_folder()
    metadata = pd.read_csv(root / METADATA_FILE)
    metadata[["lesion_id", "image_id", "dx"]].to_csv(root / METADATA_FILE, index=False)
    frame = load_ham10000(root)
    assert (frame["sex"] == "unknown").all() and frame["age"].isna().all()


def test_duplicate_image_files_keep_the_first_copy(make_folder):
    root = make_folder()
    copy = root / "ham10000_images_part_1"  # Kaggle ships a second, lower-case copy
    copy.mkdir()
    first = next(root.glob("*.jpg"))
    (copy / first.name).write_bytes(first.read_bytes())
    frame = load_ham10000(root)
    assert frame.loc[frame["image_id"] == first.stem, "path"].item() == str(first)


# Each case turns a good folder into a bad one; the error must name the culprit.
def _no_folder(root: Path) -> Path:
    return root / "does-not-exist"


def _no_metadata(root: Path) -> Path:
    (root / METADATA_FILE).unlink()
    return root


def _edit_metadata(edit):
    def apply(root: Path) -> Path:
        metadata = pd.read_csv(root / METADATA_FILE, dtype=str)
        edit(metadata).to_csv(root / METADATA_FILE, index=False)
        return root
    return apply


def _set_cell(column, value, row=1):
    def edit(metadata):
        metadata.loc[row, column] = value
        return metadata
    return edit


def _garbage_metadata(root: Path) -> Path:
    (root / METADATA_FILE).write_bytes(b"")
    return root


def _no_images(root: Path) -> Path:
    for image in root.glob("*.jpg"):
        image.unlink()
    return root


def _two_missing_images(root: Path) -> Path:
    for image in sorted(root.glob("*.jpg"))[:2]:
        image.unlink()
    return root


BAD_FOLDERS = {
    "folder missing": (_no_folder, DataDirNotFoundError, "does not exist"),
    "no metadata": (_no_metadata, MetadataNotFoundError, METADATA_FILE),
    "empty metadata file": (_garbage_metadata, MetadataFormatError, "cannot be read as CSV"),
    "missing column": (_edit_metadata(lambda m: m.drop(columns="dx")), MetadataFormatError,
                       "missing required column(s) dx"),
    "empty lesion_id": (_edit_metadata(_set_cell("lesion_id", "")), MetadataFormatError,
                        "column lesion_id is empty on line 3"),
    "unknown dx": (_edit_metadata(_set_cell("dx", "melanoma")), UnknownDiagnosisError,
                   "line 3 has dx 'melanoma'"),
    "bad age": (_edit_metadata(_set_cell("age", "old")), MetadataFormatError,
                "column age has non-numeric value 'old' on line 3"),
    "duplicate image_id": (_edit_metadata(lambda m: pd.concat([m, m.iloc[[0]]])),
                           DuplicateImageIdError, "appears on lines 2, "),
    "no images": (_no_images, NoImagesError, "no .jpeg/.jpg/.png images found"),
    "missing images": (_two_missing_images, MissingImagesError,
                       "2 of 38 rows have no image file"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS, ids=list(BAD_FOLDERS))
def test_bad_folder_raises_a_typed_one_line_error(make_folder, case):
    breaker, error, message = BAD_FOLDERS[case]
    root = breaker(make_folder())
    with pytest.raises(error) as raised:
        load_ham10000(root)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("case", BAD_FOLDERS, ids=list(BAD_FOLDERS))
def test_bad_folder_exits_2_from_the_cli_with_one_line(make_folder, case):
    breaker, _, message = BAD_FOLDERS[case]
    root = breaker(make_folder())
    result = skinml_in_process("data", "check", str(root))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1


def test_missing_images_names_the_first_few(make_folder):
    root = make_folder()
    gone = sorted(root.glob("*.jpg"))[:2]
    for image in gone:
        image.unlink()
    with pytest.raises(MissingImagesError) as raised:
        load_ham10000(root)
    assert all(image.stem in str(raised.value) for image in gone)
    assert "--allow-missing" in str(raised.value)


def test_allow_missing_drops_rows_with_a_warning(make_folder, caplog):
    root = _two_missing_images(make_folder())
    with caplog.at_level(logging.WARNING):
        frame = load_ham10000(root, allow_missing=True)
    assert len(frame) == 36
    assert "dropped" in caplog.text and "2 of 38 rows" in caplog.text


def test_allow_missing_from_the_cli(make_folder):
    root = _two_missing_images(make_folder())
    result = skinml_in_process("data", "check", str(root), "--allow-missing")
    assert result.returncode == 0, result.stderr
    assert "images           36 (missing 2" in result.stdout


def test_images_without_metadata_are_ignored_and_counted(make_folder, caplog):
    root = make_folder()
    for name in ("ISIC_9999998.jpg", "ISIC_9999999.jpg"):
        (root / name).write_bytes(next(root.glob("ISIC_*.jpg")).read_bytes())
    with caplog.at_level(logging.WARNING):
        frame = load_ham10000(root)
    assert len(frame) == 38
    assert "ignored 2 image files" in caplog.text


def test_user_home_in_path_is_expanded(make_folder, monkeypatch):
    root = make_folder()
    monkeypatch.setenv("HOME", str(root.parent))
    assert len(load_ham10000(f"~/{root.name}")) == 38
    assert os.path.isabs(load_ham10000(f"~/{root.name}")["path"][0])
