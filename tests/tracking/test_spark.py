"""Scoring a Spark DataFrame with the registered model through `mlflow.pyfunc.spark_udf` on a
real local Spark session: the same answers as in-process predict, row for row."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.inference.requests import encode_image
from skinml.tracking.logged_model import example_jpeg, load_model

from ..conftest import NAME, SAMPLE_IMAGES, LoggedModel, image_frame, isolated_tracking

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install -e '.[spark]')")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java and no `java` is on PATH (.ci/run installs "
                "openjdk-17-jre-headless)", allow_module_level=True)

from pyspark.errors import PythonException  # noqa: E402

from skinml.tracking.spark import local_session, read_images, result_type, scoring_udf  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a JVM and two Python workers on 2 cores: 30-40 s for the module
    pytest.mark.spark,
    # PySpark 4.3 calls astype(copy=...) under pandas 3. Its notice that it does not fully
    # support pandas 3 is silenced by skinml's local_session, but pytest resets warning
    # filters after each test and this module's session is made once (tests/bench/
    # test_spark.py checks the notice is gone in a session made inside its test).
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pyspark"),
]

CHAMPION = f"models:/{NAME}@champion"
BATCH = 128  # Arrow rows per predict call in a Spark task (spark.sql...maxRecordsPerBatch)
OUTPUT = ["label", "diagnosis", "confidence", *PROBABILITY_COLUMNS]


@pytest.fixture(scope="module")
def champion(tiny_model: LoggedModel) -> Iterator[mlflow.pyfunc.PyFuncModel]:
    """The tiny model registered as champion, its store active for the module (so the
    documented URI resolves); yields it loaded, for in-process predictions."""
    with isolated_tracking(tiny_model.root):
        version = mlflow.register_model(tiny_model.model_uri, NAME).version
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
        yield load_model(CHAMPION)


@pytest.fixture(scope="module")
def spark():
    session = local_session("local[2]", {
        "spark.sql.shuffle.partitions": "2",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(BATCH),
    })
    yield session
    session.stop()


@pytest.fixture(scope="module")
def tiny_jpegs() -> list[str]:
    """600 real images as ~2 KB JPEGs, base64 (more rows than two Arrow batches per task)."""
    return [encode_image(example_jpeg(str(path), max_side=53)) for path in SAMPLE_IMAGES[:600]]


def test_spark_udf_over_an_image_column_equals_in_process_predict(spark, champion, tiny_jpegs):
    frame = pd.DataFrame({"row": range(len(tiny_jpegs)), "image": tiny_jpegs})
    score = scoring_udf(spark, CHAMPION)
    scored = (spark.createDataFrame(frame).select("row", score("image").alias("prediction"))
              .select("row", "prediction.*"))
    assert scored.columns == ["row", *OUTPUT]
    table = scored.toPandas().sort_values("row").reset_index(drop=True)
    expected = champion.predict(frame[["image"]])
    assert table["row"].tolist() == list(range(len(frame)))  # each row once
    assert table["label"].tolist() == expected["label"].tolist()
    assert table["diagnosis"].tolist() == expected["diagnosis"].tolist()
    np.testing.assert_allclose(table[OUTPUT[2:]].to_numpy(dtype=np.float64),
                               expected[OUTPUT[2:]].to_numpy(dtype=np.float64), atol=1e-6)


def test_result_type_is_the_struct_spark_udf_infers_from_the_signature(spark, champion):
    images = spark.createDataFrame(pd.DataFrame({"image": ["unused"]}))
    inferred = mlflow.pyfunc.spark_udf(spark, CHAMPION, env_manager="local")
    spelled = mlflow.pyfunc.spark_udf(spark, CHAMPION, result_type=result_type(),
                                      env_manager="local")
    schema = images.select(inferred("image")).schema[0].dataType  # planned, never run
    assert schema == images.select(spelled("image")).schema[0].dataType
    assert schema.fieldNames() == OUTPUT


def test_image_files_read_by_spark_are_scored_once_each_as_in_process(spark, champion,
                                                                      tmp_path):
    folder = tmp_path / "images"
    (folder / "part_2").mkdir(parents=True)
    files = []
    for i, source in enumerate(SAMPLE_IMAGES[:24]):
        files.append(folder / ("part_2" if i % 3 else "") / f"{source.stem}.jpg")
        files[-1].write_bytes(example_jpeg(str(source), max_side=53))
    files.append(folder / "lesion.png")
    Image.open(SAMPLE_IMAGES[30]).resize((40, 30)).save(files[-1])
    (folder / "HAM10000_metadata.csv").write_text("image_id,dx\n")  # not an image: skipped

    out = tmp_path / "scored.parquet"
    images = read_images(spark, str(folder))
    (images.select("path", scoring_udf(spark, CHAMPION)("image").alias("prediction"))
     .select("path", "prediction.*").write.parquet(str(out)))

    table = pd.read_parquet(out)
    table.index = [Path(urlparse(path).path) for path in table.pop("path")]
    assert sorted(table.index) == sorted(files)  # each file once, the CSV left out
    expected = champion.predict(image_frame(files)).set_axis(files)
    table = table.loc[files]
    assert table["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(table[OUTPUT[2:]].to_numpy(dtype=np.float64),
                               expected[OUTPUT[2:]].to_numpy(dtype=np.float64), atol=1e-6)


def test_a_bad_image_fails_the_task_with_the_models_one_line_reason(spark, champion,
                                                                    tiny_jpegs):
    """What a user sees: the job fails; the last line of the error is the model's reason,
    its row counted within the Arrow batch Spark handed the model, not the DataFrame."""
    column = [*tiny_jpegs[:BATCH + 5]]
    column[BATCH + 2] = encode_image(b"not an image")
    images = spark.createDataFrame(pd.DataFrame({"image": column})).coalesce(1)
    with pytest.raises(PythonException) as caught:
        images.select(scoring_udf(spark, CHAMPION)("image")).collect()
    reason = str(caught.value).strip().splitlines()[-1]
    assert reason == ("skinml.inference.requests.BadInput: row 2: image: cannot decode image "
                      "(not a JPEG, PNG or other known image format)"), reason
    assert spark.range(3).count() == 3  # the session lives on
