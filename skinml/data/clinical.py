"""Age, sex and body site read from a frame (HAM10000's metadata, or a served request)
into the vectors of `core.clinical`, every value checked.

Missing is normal: an absent column, None, NaN, "" and "unknown" all mean "not recorded".
Anything else that is not a number of years, a known sex or a known site is refused with
one line naming the row and the column.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from skinml.core.clinical import (
    AGE_SCALE,
    CLINICAL_COLUMNS,
    FIELDS,
    MAX_AGE,
    SEXES,
    SITES,
    missing_vector,
)
from skinml.data.errors import DataError

_MISSING_WORDS = frozenset({"", "unknown", "nan", "none", "null"})
_SEX_INDEX = {sex: i for i, sex in enumerate(SEXES)}
_SITE_INDEX = {site: i for i, site in enumerate(SITES)}


class ClinicalValueError(DataError):
    """A row's age, sex or body site is neither a known value nor missing."""

    def __init__(self, row: int, where: str, column: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.row, self.where, self.column, self.reason = row, where, column, reason


def encode_clinical(frame: pd.DataFrame, names: Sequence[str] | None = None) -> np.ndarray:
    """(rows, WIDTH) float32 vectors of `frame`'s age, sex and localization columns; a
    column the frame lacks is missing on every row. Errors name the row as `names[i]`
    (default "row i")."""
    encoded = np.tile(missing_vector(), (len(frame), 1))
    for column in CLINICAL_COLUMNS:
        if column not in frame.columns:
            continue
        read = _READERS[column]
        where = FIELDS[column]
        for i, value in enumerate(frame[column].tolist()):
            slots = read(value)
            if slots is None:
                continue
            if isinstance(slots, str):
                name = names[i] if names is not None else f"row {i}"
                raise ClinicalValueError(i, name, column, slots)
            encoded[i, where] = slots
    return encoded


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_WORDS


def _age(value: Any) -> np.ndarray | str | None:
    """The age slots, None when missing, or the reason the value is refused."""
    if _missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"age must be a number of years or null, got {_shown(value)}"
    if value < 0 or not value <= MAX_AGE:  # NaN (a numpy one) fails the second
        return f"age must be between 0 and {MAX_AGE:g} years, got {_shown(value)}"
    return np.array([float(value) / AGE_SCALE, 0.0], dtype=np.float32)


def _one_hot(index: dict[str, int], column: str, allowed: str
             ) -> Callable[[Any], np.ndarray | str | None]:
    def read(value: Any) -> np.ndarray | str | None:
        if _missing(value):
            return None
        word = value.strip().lower() if isinstance(value, str) else None
        if word not in index:
            return f"{column} must be one of {allowed} or unknown, got {_shown(value)}"
        slots = np.zeros(len(index) + 1, dtype=np.float32)
        slots[index[word]] = 1.0
        return slots
    return read


def _shown(value: Any, limit: int = 24) -> str:
    """The offending value as the error quotes it: never a whole payload."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_READERS = {
    "age": _age,
    "sex": _one_hot(_SEX_INDEX, "sex", ", ".join(SEXES)),
    "localization": _one_hot(_SITE_INDEX, "localization", ", ".join(SITES)),
}
