"""Scoring image files through Spark (`mlflow.pyfunc.spark_udf`) against in-process predict
of the same files, on a local Spark session."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from skinml.core.errors import SkinmlError
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.inference.pyfunc import CHUNK
from skinml.tracking.logged_model import load_model, predict_paths
from skinml.tracking.spark import local_session, read_images, scoring_udf

T = TypeVar("T")


@dataclass(frozen=True)
class SparkScoring:
    """One timed pass over the images through Spark, and in-process over the same files."""

    master: str
    images: int
    partitions: int  # Spark tasks: each loads the model once (spark_udf, env_manager local)
    startup_seconds: float  # the session: JVM and py4j gateway
    first_batch_seconds: float  # the first CHUNK images: Python workers start, model loads
    spark_seconds: float  # all images: read, base64, score, collect (after the two above)
    in_process_seconds: float  # predict_paths in this process, after one warm-up chunk
    max_difference: float  # largest |probability| difference, Spark vs in-process

    @property
    def spark_per_second(self) -> float:
        return self.images / self.spark_seconds

    @property
    def in_process_per_second(self) -> float:
        return self.images / self.in_process_seconds


def bench_spark(model_uri: str, image_paths: Sequence[str | Path], master: str = "local[2]",
                conf: dict[str, str] | None = None) -> SparkScoring:
    """Images/s of `model_uri` over `image_paths` through spark_udf on a local session
    (`master`; `conf` overrides `local_session`'s settings, SCORING_CONF), then in-process.

    The Spark pass excludes session start-up and a first pass over CHUNK images (reported
    apart): a long job pays them once.
    """
    paths = list(dict.fromkeys(str(Path(path).resolve()) for path in image_paths))
    if not paths:
        raise SkinmlError("bench spark: no image files given")
    with warnings.catch_warnings():
        # PySpark 4.3 warns on each pandas UDF under pandas 3; max_difference checks its
        # answers against in-process predict in this very run.
        warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas",
                                FutureWarning)
        started = time.perf_counter()
        session = local_session(master, conf)
        try:
            startup = time.perf_counter() - started
            score = scoring_udf(session, model_uri)
            first, _ = _timed(lambda: _score(session, score, paths[:CHUNK]))
            partitions = read_images(session, *paths).rdd.getNumPartitions()
            spark_seconds, table = _timed(lambda: _score(session, score, paths))
        finally:
            session.stop()
    model = load_model(model_uri)
    predict_paths(model, paths[:CHUNK])  # warm-up, as the Spark pass had
    in_process_seconds, probs = _timed(lambda: predict_paths(model, paths))
    return SparkScoring(master, len(paths), partitions, startup, first, spark_seconds,
                        in_process_seconds, _max_difference(table, paths, probs))


def _score(session, score: Callable, paths: list[str]) -> pd.DataFrame:
    scored = read_images(session, *paths).select("path", score("image").alias("prediction"))
    return scored.select("path", "prediction.*").toPandas()


def _max_difference(table: pd.DataFrame, paths: list[str], probs: np.ndarray) -> float:
    spark_paths = [urlparse(path).path for path in table["path"]]
    if sorted(spark_paths) != sorted(paths):
        raise SkinmlError(f"Spark scored {len(spark_paths)} files, not the {len(paths)} given")
    by_path = table.set_axis(spark_paths).loc[paths, list(PROBABILITY_COLUMNS)]
    return float(np.abs(by_path.to_numpy(dtype=np.float64) - probs).max())


def _timed(call: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result
