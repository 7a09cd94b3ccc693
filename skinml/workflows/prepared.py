"""The data a run trains on: a HAM10000 folder split by lesion, checked for leakage, decoded
once into the cache, and fed to the device in batches. Training, cross-validation, tuning
and the benchmarks all start here (a study's trials share one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from skinml.core.config import Config, DataConfig
from skinml.data import load_ham10000
from skinml.data.cache import ImageCache, prepare_cache
from skinml.data.clinical import encode_clinical
from skinml.data.loader import CachedBatches
from skinml.data.metadata import default_data_dir
from skinml.data.split import assert_no_leakage, split_by_lesion
from skinml.training.distributed import SINGLE, Cluster, main_first


@dataclass(frozen=True)
class PreparedData:
    config: DataConfig
    frame: pd.DataFrame
    split: pd.Series
    cache: ImageCache
    source: str

    @property
    def frame_hw(self) -> tuple[int, int]:
        """(height, width) every cached image was fitted to: what serving fits images to."""
        height, width = self.cache.images.shape[1:3]
        return int(height), int(width)

    def rows(self, split: str) -> pd.DataFrame:
        return self.frame[self.split.to_numpy() == split]


@dataclass(frozen=True)
class SplitBatches:
    train: CachedBatches
    val: CachedBatches
    test: CachedBatches


def prepare_data(config: Config, cluster: Cluster = SINGLE) -> PreparedData:
    """Load the folder, split by lesion (checked for leakage), and open the decode-once cache.

    Under torchrun rank 0 builds the cache first; the other ranks then find it complete (or
    stop with rank 0's reason when it failed).
    """
    return main_first(lambda: _prepare(config), cluster)


def _prepare(config: Config) -> PreparedData:
    data = config.data
    source = str(Path(data.dir).expanduser() if data.dir else default_data_dir())
    frame = load_ham10000(source, allow_missing=data.allow_missing)
    split = split_by_lesion(frame, val_frac=data.val_frac, test_frac=data.test_frac,
                            seed=data.split_seed)
    assert_no_leakage(frame, split)
    cache = prepare_cache(frame, size=data.cache_size, skip_corrupt=data.skip_corrupt,
                          workers=config.runtime.workers or None,
                          progress=config.runtime.progress)
    kept = ~frame["image_id"].isin(set(cache.skipped))
    return PreparedData(data, frame[kept], split[kept], cache, source)


def batches_for(data: PreparedData, name: str, batch_size: int, device: torch.device,
                clinical: bool = False) -> CachedBatches:
    """The `name` split's batches; with `clinical`, each row's age, sex and body site ride
    along (a fusion model's second input; the cache stays images only)."""
    chosen = data.rows(name)
    vectors = encode_clinical(chosen, names=[f"{data.source}: image {i}"
                                             for i in chosen["image_id"]]) if clinical else None
    return CachedBatches(data.cache.images, data.cache.rows(chosen["image_id"]),
                         chosen["label"].to_numpy(), batch_size, device, clinical=vectors)


def split_batches(data: PreparedData, config: Config, device: torch.device) -> SplitBatches:
    """Training batches of `optim.batch_size`; validation and test of `eval_batch_size`."""
    batch, eval_batch = config.optim.batch_size, config.runtime.eval_batch_size
    clinical = config.model.metadata != "none"
    return SplitBatches(batches_for(data, "train", batch, device, clinical),
                        batches_for(data, "val", eval_batch, device, clinical),
                        batches_for(data, "test", eval_batch, device, clinical))
