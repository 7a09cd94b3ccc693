"""Shared fixtures: small HAM10000 folders built from the bundled real sample."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from skinml.data.metadata import METADATA_FILE, default_data_dir

FIXTURES = Path(__file__).parent / "fixtures"
FULL_METADATA = FIXTURES / "HAM10000_metadata_full.csv"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test writes to ~/.cache: each gets its own SKINML_CACHE."""
    monkeypatch.setenv("SKINML_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def sample_metadata() -> pd.DataFrame:
    return pd.read_csv(default_data_dir() / METADATA_FILE)


@pytest.fixture
def make_folder(tmp_path: Path, sample_metadata: pd.DataFrame) -> Callable[..., Path]:
    """Build a small real HAM10000 folder: `lesions_per_class` whole lesions of each class.

    layout "flat" puts the JPEGs at the root; "parts" splits them over
    HAM10000_images_part_1/ and HAM10000_images_part_2/ as the dataset ships.
    """

    def make(name: str = "ham", layout: str = "flat", lesions_per_class: int = 3) -> Path:
        root = tmp_path / name
        root.mkdir()
        first_lesions = (sample_metadata.drop_duplicates("lesion_id")
                         .groupby("dx").head(lesions_per_class)["lesion_id"])
        rows = sample_metadata[sample_metadata["lesion_id"].isin(first_lesions)]
        for i, image_id in enumerate(rows["image_id"]):
            folder = root
            if layout == "parts":
                folder = root / f"HAM10000_images_part_{1 + i % 2}"
                folder.mkdir(exist_ok=True)
            shutil.copy(default_data_dir() / f"{image_id}.jpg", folder / f"{image_id}.jpg")
        rows.to_csv(root / METADATA_FILE, index=False)
        return root

    return make
