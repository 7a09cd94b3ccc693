"""The labelled images a model is judged on, one table shape for all of them.

A training run's own split (from its split.csv), every image of a HAM10000 folder, or
ISIC 2018 Task 3 images with the official one-hot ground truth. Each is a DataFrame with
image_id, path, label, dx and lesion_id (HAM10000 folders add sex, age, localization), and
`digest` names exactly which images, labels and pixels two judgements shared.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from skinml.core.errors import SkinmlError
from skinml.core.labels import CLASS_INDEX, ISIC_COLUMNS
from skinml.data.metadata import default_data_dir, find_images, load_ham10000
from skinml.tracking import reader


def folder_images(data_dir: str | Path | None) -> pd.DataFrame:
    """Every labelled image of a HAM10000 folder (the bundled sample when None)."""
    return load_ham10000(data_dir or default_data_dir())


def run_split_images(run_id: str, split: str, data_dir: str | Path | None = None
                     ) -> pd.DataFrame:
    """The `split` images of a training run, found in `data_dir` or the run's own folder."""
    data_dir = data_dir or reader.run_params(run_id).get("data.dir") or default_data_dir()
    frame = load_ham10000(data_dir)
    table = reader.run_table(run_id, "split.csv")
    if table is None:
        raise SkinmlError(f"run {run_id} has no split.csv: it is not a skinml training run")
    wanted = table.loc[table["split"] == split, "image_id"]
    missing = sorted(set(wanted) - set(frame["image_id"]))
    if missing:
        raise SkinmlError(f"{len(missing)} of the {len(wanted)} {split} images of run {run_id} "
                          f"are not in {data_dir} (first: {', '.join(missing[:3])}); pass the "
                          "training --data-dir")
    return frame[frame["image_id"].isin(set(wanted))].reset_index(drop=True)


def isic_images(truth_csv: str | Path, data_dir: str | Path) -> pd.DataFrame:
    """ISIC 2018 Task 3: image folder + ground-truth CSV (image, MEL, NV, ... one-hot)."""
    path = Path(truth_csv)
    try:
        truth = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SkinmlError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") \
            from None
    absent = [c for c in ["image", *ISIC_COLUMNS] if c not in truth.columns]
    if absent:
        raise SkinmlError(f"{path}: missing column(s) {', '.join(absent)}")
    onehot = truth[list(ISIC_COLUMNS)].to_numpy(dtype=float)
    bad = np.flatnonzero((onehot.sum(1) != 1) | ~np.isin(onehot, (0.0, 1.0)).all(1))
    if len(bad):
        raise SkinmlError(f"{path}: line {bad[0] + 2} is not one-hot over "
                          f"{', '.join(ISIC_COLUMNS)} ({len(bad)} rows in all)")
    files = find_images(Path(data_dir).expanduser())
    ids = truth["image"].astype(str).str.replace(r"\.jpg$", "", regex=True, case=False)
    missing = [i for i in ids if i not in files]
    if missing:
        raise SkinmlError(f"{len(missing)} images of {path} are not in {data_dir} "
                          f"(first: {', '.join(missing[:3])})")
    dx = [ISIC_COLUMNS[c] for c in np.array(list(ISIC_COLUMNS))[onehot.argmax(1)]]
    return pd.DataFrame({"image_id": ids, "path": [str(files[i]) for i in ids],
                         "label": [CLASS_INDEX[d] for d in dx], "dx": dx,
                         "lesion_id": ids})  # no lesion ids in ISIC 2018: resample images


def digest(images: pd.DataFrame) -> str:
    """SHA-256 of the set: image ids, labels, lesions and the image files' bytes, in id order.

    Two judgements with the same digest saw the same pictures with the same answers,
    whatever folder or machine they were read from.
    """
    sha = hashlib.sha256()
    for row in images.sort_values("image_id").itertuples():
        sha.update(f"{row.image_id}\t{row.label}\t{row.lesion_id}\t".encode())
        sha.update(hashlib.sha256(Path(row.path).read_bytes()).digest())
    return sha.hexdigest()


def training_overlap(images: pd.DataFrame, run_id: str) -> int:
    """How many of `images` the run trained or selected its epoch on (its train/val split)."""
    table = reader.run_table(run_id, "split.csv")
    if table is None:
        return 0
    seen = set(table.loc[table["split"].isin(["train", "val"]), "image_id"])
    return int(images["image_id"].isin(seen).sum())
