"""Age, sex and body site into vectors: known values one-hot, missing as missing, anything
else refused in one line naming the row and the column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinml.core.clinical import AGE_SCALE, FIELDS, SEXES, SITES, WIDTH, missing_vector
from skinml.data.clinical import ClinicalValueError, encode_clinical


def test_the_layout_has_a_missing_slot_per_field():
    vector = missing_vector()
    assert vector.shape == (WIDTH,) == (2 + len(SEXES) + 1 + len(SITES) + 1,)
    assert [vector[where].tolist()[-1] for where in FIELDS.values()] == [1.0, 1.0, 1.0]
    assert vector.sum() == 3


def test_known_values_are_one_hot_and_ages_scaled():
    frame = pd.DataFrame({"age": [45, 70.0], "sex": ["male", " Female "],
                          "localization": ["back", "Lower Extremity"]})
    encoded = encode_clinical(frame)
    assert encoded.dtype == np.float32 and encoded.shape == (2, WIDTH)
    np.testing.assert_allclose(encoded[:, FIELDS["age"]], [[45 / AGE_SCALE, 0],
                                                           [70 / AGE_SCALE, 0]])
    assert encoded[0, FIELDS["sex"]].tolist() == [1, 0, 0]
    assert encoded[1, FIELDS["sex"]].tolist() == [0, 1, 0]
    site = encoded[:, FIELDS["localization"]]
    assert site[0].argmax() == SITES.index("back") and site[1].argmax() == SITES.index(
        "lower extremity") and site.sum() == 2


@pytest.mark.parametrize("value", [None, np.nan, "", "unknown", "UNKNOWN", "null", pd.NA])
def test_every_spelling_of_missing_is_missing(value):
    frame = pd.DataFrame({"age": [value], "sex": [value], "localization": [value]},
                         dtype=object)
    np.testing.assert_array_equal(encode_clinical(frame)[0], missing_vector())


def test_absent_columns_are_missing_on_every_row():
    encoded = encode_clinical(pd.DataFrame({"image": ["a", "b"], "sex": ["female", None]}))
    np.testing.assert_array_equal(encoded[1], missing_vector())
    assert encoded[0, FIELDS["sex"]].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(encoded[0, FIELDS["localization"]],
                                  missing_vector()[FIELDS["localization"]])


BAD = {
    "age text": ("age", "forty", "row 1: age must be a number of years or null, got 'forty'"),
    "age bool": ("age", True, "row 1: age must be a number of years or null, got True"),
    "age range": ("age", 130, "row 1: age must be between 0 and 120 years, got 130"),
    "age negative": ("age", -1.5, "row 1: age must be between 0 and 120 years, got -1.5"),
    "sex": ("sex", "M", "row 1: sex must be one of male, female or unknown, got 'M'"),
    "sex number": ("sex", 1, "row 1: sex must be one of male, female or unknown, got 1"),
    "site": ("localization", "elbow", "row 1: localization must be one of abdomen, "),
    "site long": ("localization", "x" * 5000, "got 'xxxxxxxxxxxxxxxxxxxx..."),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_value_is_one_line_naming_row_and_column(case):
    column, value, message = BAD[case]
    frame = pd.DataFrame({column: ["unknown", value, "also bad"]}, dtype=object)
    if column == "age":
        frame[column] = [None, value, "also bad"]
    with pytest.raises(ClinicalValueError) as caught:
        encode_clinical(frame)
    error = caught.value
    assert str(error).startswith(message) if not case.startswith("site long") else \
        message in str(error)
    assert (error.row, error.column) == (1, column)  # the first bad row, not the last
    assert "\n" not in str(error) and len(str(error)) < 200


def test_errors_name_rows_as_the_caller_does():
    frame = pd.DataFrame({"localization": ["back", "elbow"]})
    with pytest.raises(ClinicalValueError, match=r"^image ISIC_2: localization must"):
        encode_clinical(frame, names=["image ISIC_1", "image ISIC_2"])
