"""Lesion-grouped splits: on the full real HAM10000 metadata and on random metadata."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skinml.core.labels import CLASSES
from skinml.data import SplitError, load_ham10000
from skinml.data.errors import TooManyFoldsError
from skinml.data.split import (
    MIN_FOLD_IMAGES,
    SPLITS,
    assert_no_leakage,
    assign_folds,
    fold_split,
    split_by_lesion,
)

from ..conftest import FULL_METADATA


@pytest.fixture(scope="module")
def full() -> pd.DataFrame:
    return pd.read_csv(FULL_METADATA)


@pytest.fixture(scope="module")
def full_split(full) -> pd.Series:
    """The split of all 10,015 images (8-15 s of sklearn on 2 cores: its tests are slow)."""
    return split_by_lesion(full, seed=0)


@pytest.mark.slow
def test_split_never_shares_a_lesion_on_the_full_metadata(full, full_split):
    assert_no_leakage(full, full_split)
    assert (full_split.groupby(full["lesion_id"]).nunique() == 1).all()


@pytest.mark.slow
def test_split_fractions_are_counted_in_images(full_split):
    shares = full_split.value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.15, abs=0.005)
    assert shares["test"] == pytest.approx(0.15, abs=0.005)


@pytest.mark.slow
def test_split_keeps_class_shares_within_2_points(full, full_split):
    lesions = full.groupby("dx")["lesion_id"].nunique()
    overall = full["dx"].value_counts(normalize=True)
    for name in SPLITS:
        shares = full.loc[full_split == name, "dx"].value_counts(normalize=True)
        for dx in lesions.index[lesions >= 100]:
            assert abs(shares[dx] - overall[dx]) <= 0.02, (name, dx)


def test_split_is_deterministic_for_a_seed(full):
    part = full.head(3000)  # a third of the metadata: a third of sklearn's time
    first = split_by_lesion(part, seed=0)
    assert split_by_lesion(part, seed=0).equals(first)
    assert not split_by_lesion(part, seed=1).equals(first)


def test_every_class_of_the_sample_is_in_every_split():
    frame = load_ham10000()
    split = split_by_lesion(frame)
    table = pd.crosstab(frame["dx"], split)
    assert list(table.index) == list(CLASSES)
    assert (table[list(SPLITS)] > 0).all().all()


@st.composite
def metadata(draw) -> pd.DataFrame:
    """Random HAM-like metadata: lesions of 1-4 images, skewed classes, a shuffled index."""
    n_lesions = draw(st.integers(min_value=20, max_value=120))
    classes = draw(st.lists(st.sampled_from(CLASSES), min_size=n_lesions, max_size=n_lesions))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n_lesions, max_size=n_lesions))
    rows = [(f"L{i}", dx) for i, (dx, k) in enumerate(zip(classes, sizes, strict=True))
            for _ in range(k)]
    frame = pd.DataFrame(rows, columns=["lesion_id", "dx"])
    frame["image_id"] = [f"I{i}" for i in range(len(frame))]
    order = draw(st.permutations(range(len(frame))))
    return frame.iloc[list(order)].set_index(pd.Index([7 * i + 3 for i in order]))


@settings(max_examples=40, deadline=None)
@given(frame=metadata(), seed=st.integers(0, 2**16))
def test_split_properties_hold_on_random_metadata(frame, seed):
    split = split_by_lesion(frame, seed=seed)
    assert split.index.equals(frame.index)
    assert set(split) <= set(SPLITS)
    assert_no_leakage(frame, split)
    lesions = frame.groupby("dx")["lesion_id"].nunique()
    for dx in lesions.index[lesions >= 3]:
        present = set(split[frame["dx"] == dx])
        assert present == set(SPLITS), (dx, present)
    assert split.equals(split_by_lesion(frame, seed=seed))


@settings(max_examples=15, deadline=None)
@given(frame=metadata(), seed=st.integers(0, 2**16), k=st.integers(2, 5))
def test_fold_properties_hold_on_random_metadata(frame, seed, k):
    split = split_by_lesion(frame, seed=seed)
    rest = frame[split != "test"]
    lesions = rest.groupby("dx")["lesion_id"].nunique().reindex(frame["dx"].unique(),
                                                                fill_value=0)
    if lesions.min() < k:  # some fold would validate on no image of that class
        with pytest.raises(TooManyFoldsError, match=f"--folds {k}: class "):
            assign_folds(frame, split, k, seed=seed)
        return
    folds = assign_folds(frame, split, k, seed=seed)
    assert folds.index.equals(frame.index)
    assert (folds[split == "test"] == -1).all()  # the test split is never a fold
    assert set(folds[split != "test"]) == set(range(k))  # every other image in one fold
    assert (folds.groupby(frame["lesion_id"]).nunique() == 1).all()  # lesion-disjoint
    for fold in range(k):
        assert_no_leakage(frame, fold_split(split, folds, fold))
    for dx in lesions.index:  # every class validates in every fold
        assert set(folds[rest.index[rest["dx"] == dx]]) == set(range(k)), dx
    assert folds.equals(assign_folds(frame, split, k, seed=seed))


def test_folds_need_two_and_enough_lesions():
    frame = pd.DataFrame({"lesion_id": ["A", "B", "C", "D"], "dx": ["nv", "nv", "nv", "df"],
                          "image_id": ["1", "2", "3", "4"]})
    split = pd.Series(["train", "val", "test", "test"])
    with pytest.raises(SplitError, match="at least 2 folds"):
        assign_folds(frame, split, 1)
    with pytest.raises(TooManyFoldsError, match="--folds 2: class df has only 0 lesions "
                       "outside the test split; cross-validation needs at least 2 of each"):
        assign_folds(frame, split, 2)  # df's one lesion is in the test split


@pytest.fixture(scope="module")
def sample_lesions() -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """The bundled sample, its split, and its lesions per class outside the test split."""
    frame = load_ham10000()
    split = split_by_lesion(frame)
    rest = frame[split != "test"]
    return frame, split, rest.groupby("dx")["lesion_id"].nunique()


def test_more_folds_than_a_class_has_lesions_is_refused_naming_the_class(sample_lesions):
    frame, split, lesions = sample_lesions
    fewest, dx = lesions.min(), lesions.idxmin()
    message = (f"--folds {fewest + 1}: class {dx} has only {fewest} lesions outside the test "
               f"split; at most {fewest} folds")
    with pytest.raises(TooManyFoldsError) as refused:
        assign_folds(frame, split, fewest + 1)
    assert str(refused.value) == message


def test_folds_too_small_to_score_steadily_warn_once(sample_lesions, caplog):
    frame, split, lesions = sample_lesions
    k = int(lesions.min())  # accepted, but each fold validates on about one lesion of dx
    with caplog.at_level(logging.WARNING, logger="skinml.data.split"):
        folds = assign_folds(frame, split, k)
    rest = folds[folds >= 0]
    images = pd.crosstab(frame.loc[rest.index, "dx"], rest)
    small = int((images < MIN_FOLD_IMAGES).any(axis=0).sum())
    assert 0 < small <= k
    assert [r.getMessage() for r in caplog.records] == [
        f"--folds {k}: {small} of {k} validation folds hold fewer than {MIN_FOLD_IMAGES} "
        f"images of a class (as few as {images.min(axis=1).min()} of "
        f"{images.min(axis=1).idxmin()}); their scores are noisy, fewer folds give steadier ones"]


def test_folds_large_enough_to_score_do_not_warn(sample_lesions, caplog):
    frame, split, _ = sample_lesions
    with caplog.at_level(logging.WARNING, logger="skinml.data.split"):
        folds = assign_folds(frame, split, 3)
    rest = folds[folds >= 0]
    assert pd.crosstab(frame.loc[rest.index, "dx"], rest).min().min() >= MIN_FOLD_IMAGES
    assert caplog.records == []


def test_assert_no_leakage_names_the_leaking_lesion():
    frame = pd.DataFrame({"lesion_id": ["A", "A", "B"], "dx": ["nv", "nv", "mel"]})
    split = pd.Series(["train", "test", "val"], index=frame.index)
    with pytest.raises(SplitError, match="lesion A has images in test and train"):
        assert_no_leakage(frame, split)


def test_assert_no_leakage_rejects_a_misaligned_split():
    frame = pd.DataFrame({"lesion_id": ["A", "B"], "dx": ["nv", "mel"]})
    with pytest.raises(SplitError, match="not aligned"):
        assert_no_leakage(frame, pd.Series(["train", "val"], index=[5, 6]))


@pytest.mark.parametrize("val_frac, test_frac, message", [
    (0.0, 0.15, "val_frac must be between 0 and 1"),
    (0.15, 1.2, "test_frac must be between 0 and 1"),
    (0.5, 0.5, "must be below 1"),
    (0.123, 0.15, "multiples of 1/100"),
])
def test_bad_fractions_are_refused(val_frac, test_frac, message):
    frame = load_ham10000()
    with pytest.raises(SplitError, match=message):
        split_by_lesion(frame, val_frac=val_frac, test_frac=test_frac)


def test_other_fractions_are_honoured():
    frame = pd.read_csv(FULL_METADATA).head(3000)
    shares = split_by_lesion(frame, val_frac=0.1, test_frac=0.2).value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.1, abs=0.01)
    assert shares["test"] == pytest.approx(0.2, abs=0.01)


def test_too_few_lesions_is_a_clear_error():
    frame = pd.DataFrame({"lesion_id": list("ABCDE"), "dx": ["nv"] * 5})
    with pytest.raises(SplitError, match="at least 20 lesions"):
        split_by_lesion(frame)
