"""Lesion-grouped, dx-stratified train/val/test splits: no lesion is ever in two splits."""

from __future__ import annotations

import logging
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from skinml.data.errors import SplitError, TooManyFoldsError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_MAX_FOLDS = 100
_MIN_LESIONS_EVERYWHERE = 3
# Balanced accuracy averages the 7 class recalls: a class with n validation images moves a
# fold's score in steps of 1/(7n), more than 2.9 points below 5 images, which is more than
# the gaps between configs that a fold's best epoch and a study's trials are chosen on.
MIN_FOLD_IMAGES = 5


def split_by_lesion(df: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15,
                    seed: int = 0) -> pd.Series:
    """Assign each row "train", "val" or "test", aligned to `df.index`.

    HAM10000 has 10,015 images of 7,470 lesions: an image split would put photos of the
    same lesion on both sides. sklearn's StratifiedGroupKFold cuts the data into k
    dx-stratified, lesion-disjoint folds of 1/k of the images each; test and val take
    whole folds. Every class with at least 3 lesions then gets a lesion in each split.
    """
    n_folds, n_val, n_test = _folds_for(val_frac, test_frac)
    n_lesions = df["lesion_id"].nunique()
    if n_lesions < n_folds:
        raise SplitError(f"cannot split {n_lesions} lesions into val_frac={val_frac}, "
                         f"test_frac={test_frac}: at least {n_folds} lesions are needed")
    if df["dx"].value_counts().max() >= n_folds:
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:  # too few images for sklearn to stratify; the repair step still spreads classes
        folds = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    split = np.full(len(df), "train", dtype=object)
    with warnings.catch_warnings():
        # Rare classes have fewer lesions than folds; the repair step below handles them.
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, fold_rows) in enumerate(folds.split(df, df["dx"], df["lesion_id"])):
            if fold < n_test:
                split[fold_rows] = "test"
            elif fold < n_test + n_val:
                split[fold_rows] = "val"
    result = pd.Series(split, index=df.index, name="split")
    return _give_each_part_a_lesion(df, result, SPLITS, _MIN_LESIONS_EVERYWHERE)


def assign_folds(df: pd.DataFrame, split: pd.Series, k: int, seed: int = 0,
                 warn: bool = True) -> pd.Series:
    """Cross-validation folds 0..k-1 for the rows outside the test split (test rows: -1).

    The test split stays as `split_by_lesion` made it, so cross-validation never sees it;
    the rest is cut by StratifiedGroupKFold on dx, grouped by lesion, and every class then
    gets a lesion in every fold (`check_fold_count` refuses a k for which it cannot). One
    warning when some fold validates on fewer than MIN_FOLD_IMAGES images of a class
    (unless `warn` is off: a study's trials, warned once by the study).
    """
    check_fold_count(df, split, k)
    rest = df[split.to_numpy() != "test"]
    # Every class has >= k lesions, so >= k images: sklearn stratifies without a warning.
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    assigned = np.zeros(len(rest), dtype=int)
    for fold, (_, rows) in enumerate(folds.split(rest, rest["dx"], rest["lesion_id"])):
        assigned[rows] = fold
    repaired = _give_each_part_a_lesion(rest, pd.Series(assigned, index=rest.index),
                                        tuple(range(k)), k)
    if warn:
        _warn_of_small_folds(rest["dx"], repaired, k)
    return repaired.reindex(df.index, fill_value=-1).astype(int).rename("fold")


def check_fold_count(df: pd.DataFrame, split: pd.Series, k: int) -> None:
    """Raise TooManyFoldsError unless every class has at least k lesions outside the test
    split (with fewer, some fold would validate on no image of that class)."""
    if k < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, got {k}")
    rest = df[split.to_numpy() != "test"]
    lesions = (rest.groupby("dx")["lesion_id"].nunique()
               .reindex(sorted(df["dx"].unique()), fill_value=0))
    fewest, dx = int(lesions.min()), lesions.idxmin()
    if fewest >= k:
        return
    limit = (f"at most {fewest} folds" if fewest >= 2
             else "cross-validation needs at least 2 of each class")
    raise TooManyFoldsError(f"--folds {k}: class {dx} has only {fewest} "
                            f"lesion{'' if fewest == 1 else 's'} outside the test split; {limit}")


def fold_split(split: pd.Series, folds: pd.Series, fold: int) -> pd.Series:
    """The train/val/test split of one fold: `fold` validates, the other folds train."""
    values = np.where(folds.to_numpy() == fold, "val", "train").astype(object)
    values[split.to_numpy() == "test"] = "test"
    return pd.Series(values, index=split.index, name="split")


def assert_no_leakage(df: pd.DataFrame, split: pd.Series) -> None:
    """Raise SplitError if any lesion_id has images in two splits, or the split is malformed."""
    if not split.index.equals(df.index):
        raise SplitError("split is not aligned with the metadata rows (index differs)")
    unknown = set(split.unique()) - set(SPLITS)
    if unknown:
        raise SplitError(f"split has value(s) {sorted(map(str, unknown))}, "
                         f"not one of {', '.join(SPLITS)}")
    per_lesion = split.groupby(df["lesion_id"]).nunique()
    leaking = per_lesion.index[per_lesion > 1]
    if len(leaking):
        lesion = leaking[0]
        where = sorted(split[df["lesion_id"] == lesion].unique())
        raise SplitError(f"lesion {lesion} has images in {' and '.join(where)} "
                         f"({len(leaking)} lesion(s) leak across splits)")


def _warn_of_small_folds(dx: pd.Series, folds: pd.Series, k: int) -> None:
    images = pd.crosstab(dx, folds)  # class x fold: validation images
    small = (images < MIN_FOLD_IMAGES).any(axis=0)
    if small.any():
        fewest = images.min(axis=1)
        log.warning("--folds %d: %d of %d validation folds hold fewer than %d images of a "
                    "class (as few as %d of %s); their scores are noisy, fewer folds give "
                    "steadier ones", k, int(small.sum()), k, MIN_FOLD_IMAGES,
                    int(fewest.min()), fewest.idxmin())


def _folds_for(val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """The fewest folds k with val_frac*k and test_frac*k whole numbers."""
    for name, value in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0 < value < 1:
            raise SplitError(f"{name} must be between 0 and 1 (exclusive), got {value}")
    if val_frac + test_frac >= 1:
        raise SplitError(f"val_frac + test_frac must be below 1, got {val_frac + test_frac:g}")
    val, test = (Fraction(v).limit_denominator(_MAX_FOLDS) for v in (val_frac, test_frac))
    if abs(float(val) - val_frac) > 1e-9 or abs(float(test) - test_frac) > 1e-9:
        raise SplitError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be "
                         f"multiples of 1/{_MAX_FOLDS} or simple fractions such as 1/3")
    n_folds = int(np.lcm(val.denominator, test.denominator))
    if n_folds > _MAX_FOLDS:
        raise SplitError(f"val_frac ({val_frac}) and test_frac ({test_frac}) together need "
                         f"{n_folds} folds; use fractions with a common denominator <= 100")
    return n_folds, round(val_frac * n_folds), round(test_frac * n_folds)


def _give_each_part_a_lesion(df: pd.DataFrame, part: pd.Series, parts: tuple,
                             min_lesions: int) -> pd.Series:
    """Move whole lesions so each class with >= `min_lesions` lesions appears in every part
    (the splits, or the folds).

    The donor is the part holding most lesions of that class (ties: the first of `parts`,
    i.e. train); the lesion moved is its smallest (fewest images), so the image fractions
    barely change.
    """
    lesions = pd.DataFrame({"lesion_id": df["lesion_id"], "dx": df["dx"], "part": part})
    table = (lesions.groupby("lesion_id", sort=True)
             .agg(dx=("dx", "first"), part=("part", "first"), images=("dx", "size")))
    for _, members in table.groupby("dx", sort=True):
        if len(members) < min_lesions:
            continue
        for target in parts:
            counts = table.loc[members.index, "part"].value_counts()
            if counts.get(target, 0):
                continue
            donor = max(parts, key=lambda p: (counts.get(p, 0), p == parts[0]))
            candidates = table.loc[members.index]
            candidates = candidates[candidates["part"] == donor]
            moved = candidates.sort_values(["images"], kind="stable").index[0]
            table.loc[moved, "part"] = target
    return df["lesion_id"].map(table["part"]).rename(part.name)
