"""Typed errors for HAM10000 folders, each raised with one sentence naming the culprit."""

from skinml.core.errors import SkinmlError


class DataError(SkinmlError):
    """A HAM10000 folder or its metadata cannot be used as it is."""


class DataDirNotFoundError(DataError):
    """The data folder does not exist or is not a folder."""


class MetadataNotFoundError(DataError):
    """The folder has no HAM10000_metadata.csv at its root."""


class MetadataFormatError(DataError):
    """The metadata file cannot be parsed, lacks a required column or has empty values."""


class UnknownDiagnosisError(DataError):
    """A dx value is not one of the seven HAM10000 classes."""


class DuplicateImageIdError(DataError):
    """The same image_id appears on more than one metadata row."""


class NoImagesError(DataError):
    """No JPEG or PNG image was found anywhere below the folder."""


class MissingImagesError(DataError):
    """Metadata rows whose image file is not in the folder."""


class CorruptImageError(DataError):
    """An image file cannot be decoded completely."""


class SplitError(DataError):
    """A split cannot be made or is invalid (bad fractions, lesion leakage)."""


class TooManyFoldsError(SplitError):
    """More cross-validation folds than some class has lesions outside the test split."""
