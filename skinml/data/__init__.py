"""The HAM10000 data layer: folders, lesion-grouped splits (`skinml.data.split`), the
decode-once cache."""

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

# The splits are imported from `skinml.data.split`, not from here: it imports sklearn
# (0.9 s), which a process that only serves or scores a model never needs.

__all__ = [
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
    "default_data_dir",
    "load_ham10000",
    "scan_folder",
]
