"""The HAM10000 data layer: folders, lesion-grouped splits, the decode-once cache."""

from skinml.data.errors import (
    CorruptImageError,
    DataDirNotFoundError,
    DataError,
    DuplicateImageIdError,
    MetadataFormatError,
    MetadataNotFoundError,
    MissingImagesError,
    NoImagesError,
    SplitError,
    UnknownDiagnosisError,
)
from skinml.data.metadata import default_data_dir, load_ham10000, scan_folder
from skinml.data.split import SPLITS, assert_no_leakage, split_by_lesion

__all__ = [
    "SPLITS",
    "CorruptImageError",
    "DataDirNotFoundError",
    "DataError",
    "DuplicateImageIdError",
    "MetadataFormatError",
    "MetadataNotFoundError",
    "MissingImagesError",
    "NoImagesError",
    "SplitError",
    "UnknownDiagnosisError",
    "assert_no_leakage",
    "default_data_dir",
    "load_ham10000",
    "scan_folder",
    "split_by_lesion",
]
