"""Age, sex and body site as a fixed-width vector: the one layout the data layer writes
and the fusion models read (as `labels.py` is for the classes).

Each field has a slot meaning "not recorded", so a missing value is a value the network
learns, never a zero that looks like a real one:

    [age / 100, age missing | male, female, sex missing | 14 sites, site missing]
"""

from __future__ import annotations

import numpy as np

CLINICAL_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")
SEXES: tuple[str, ...] = ("male", "female")
# HAM10000's body sites (its `localization` column; "unknown" is the missing slot).
SITES: tuple[str, ...] = ("abdomen", "acral", "back", "chest", "ear", "face", "foot",
                          "genital", "hand", "lower extremity", "neck", "scalp", "trunk",
                          "upper extremity")
AGE_SCALE = 100.0  # years -> about 0..1
MAX_AGE = 120.0

# Where each field lives in the vector; its last slot is the "missing" flag.
FIELDS: dict[str, slice] = {
    "age": slice(0, 2),
    "sex": slice(2, 2 + len(SEXES) + 1),
    "localization": slice(3 + len(SEXES), 3 + len(SEXES) + len(SITES) + 1),
}
WIDTH = FIELDS["localization"].stop


def missing_vector() -> np.ndarray:
    """The vector of a row with nothing recorded: every field's missing flag set."""
    vector = np.zeros(WIDTH, dtype=np.float32)
    for where in FIELDS.values():
        vector[where.stop - 1] = 1.0
    return vector
