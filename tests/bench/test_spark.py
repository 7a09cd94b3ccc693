"""`bench_spark`: image files scored through spark_udf on a local session and in-process,
timed apart and checked against each other."""

from __future__ import annotations

import shutil

import pytest

from skinml.core.errors import SkinmlError
from skinml.tracking.logged_model import example_jpeg

from ..conftest import SAMPLE_IMAGES

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install -e '.[spark]')")

from skinml.bench.spark import bench_spark  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java and no "
                                "`java` is on PATH (.ci/run installs openjdk-17-jre-headless)")


@pytest.mark.slow  # a JVM and two Python workers on 2 cores: ~25 s
@pytest.mark.spark
@needs_java
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pyspark")  # astype(copy=) on pandas 3
# skinml's session silences PySpark's notice about pandas 3 (its UDF is tested under it)
@pytest.mark.filterwarnings("error:PySpark does not yet fully support pandas:FutureWarning")
def test_bench_spark_times_each_image_once_and_agrees_with_in_process(tiny_model, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_model.tracking_uri)
    paths = []
    for source in SAMPLE_IMAGES[:16]:
        paths.append(tmp_path / f"{source.stem}.jpg")
        paths[-1].write_bytes(example_jpeg(str(source), max_side=53))
    result = bench_spark(tiny_model.model_uri, [*paths, paths[0]], master="local[2]")
    assert result.images == 16 and result.master == "local[2]"  # the repeated path once
    assert result.partitions >= 1
    assert min(result.startup_seconds, result.first_batch_seconds, result.spark_seconds,
               result.in_process_seconds) > 0
    assert result.spark_per_second == pytest.approx(16 / result.spark_seconds)
    assert result.max_difference < 1e-6


def test_bench_spark_without_images_or_java_says_why_in_one_line(tmp_path, monkeypatch):
    # both refused before a JVM starts or the model is looked up
    with pytest.raises(SkinmlError, match="^bench spark: no image files given$"):
        bench_spark("models:/never-looked-up/1", [])
    monkeypatch.setenv("PATH", str(tmp_path))  # no java there
    with pytest.raises(SkinmlError, match="^Spark needs Java and no `java` is on PATH"):
        bench_spark("models:/never-looked-up/1", SAMPLE_IMAGES[:1])
