"""Scoring a Spark DataFrame with a logged model through `mlflow.pyfunc.spark_udf`.

The documented recipe (docs/scaling.md) is plain MLflow: image files read by Spark into the
model's `image` column, then `spark_udf(spark, uri, result_type=..., env_manager="local")`.
These helpers hold the parts worth not retyping; `skinml.bench.spark` times them.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from collections.abc import Callable

import mlflow
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from skinml.core.errors import SkinmlError
from skinml.tracking.logged_model import SIGNATURE

# Hadoop glob: the formats the model decodes (HAM10000 ships lower-case .jpg).
IMAGE_GLOB = "*.{jpg,jpeg,png,JPG,JPEG,PNG}"
# Settings for scoring images (docs/scaling.md has the measurements behind them).
SCORING_CONF = {
    # binaryFile counts each file as this many bytes when packing files into tasks (4 MB
    # by default: 2,000 JPEGs of 60 KB made 63 tasks, each loading the model); well under
    # one image, tasks are one per core, or 128 MB of files each.
    "spark.sql.files.openCostInBytes": "65536",
    # Rows per predict call: a few MB of base64, and the JVM reads the next batch meanwhile.
    # (torch keeps its default threads in each worker: OMP_NUM_THREADS=1 was slower.)
    "spark.sql.execution.arrow.maxRecordsPerBatch": "256",
}


PANDAS_NOTICE = "PySpark does not yet fully support pandas"


def result_type() -> str:
    """The UDF's return type as Spark DDL, from the model's output signature:
    "label string, diagnosis string, confidence double, p_akiec double, ...".

    spark_udf infers the same struct from the logged signature when `result_type` is left
    out; spelling it out keeps a job's output schema readable and checked at planning time.
    """
    return ", ".join(f"{spec.name} {spec.type.to_spark().simpleString()}"
                     for spec in SIGNATURE.outputs.inputs)


def read_images(spark: SparkSession, *paths: str, glob: str = IMAGE_GLOB) -> DataFrame:
    """Image files (folders searched recursively, or the files themselves) as rows of
    `path` and `image`, the file's bytes in base64 as the model's input column holds them.

    Spark reads and encodes them on its executors: no image passes through the driver.
    """
    files = (spark.read.format("binaryFile").option("pathGlobFilter", glob)
             .option("recursiveFileLookup", "true").load(list(paths)))
    # Spark 4's base64() breaks lines every 76 characters (spark.sql.chunkBase64String
    # .enabled, on by default); the model reads strict base64, as a REST client sends it.
    return files.select("path", F.translate(F.base64("content"), "\r\n", "").alias("image"))


def scoring_udf(spark: SparkSession, model_uri: str) -> Callable[..., Column]:
    """`mlflow.pyfunc.spark_udf` of a skinml model in the driver's own environment: call it
    on the `image` column; it returns a struct column with the model's output fields."""
    return mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type(),
                                   env_manager="local")


def local_session(master: str = "local[2]", conf: dict[str, str] | None = None
                  ) -> SparkSession:
    """A quiet local Spark session for scoring images (SCORING_CONF), whose Python workers
    run this interpreter (so they import the torch and MLflow installed here); `conf` adds
    or overrides settings.

    Stop it with `session.stop()`: it holds a JVM until then.
    """
    if shutil.which("java") is None:
        raise SkinmlError("Spark needs Java and no `java` is on PATH (Debian: apt-get install "
                          "openjdk-17-jre-headless)")
    # PySpark 4.3 warns on every pandas UDF that it does not fully support pandas 3; the
    # scoring UDF is tested under pandas 3 (tests/tracking/test_spark.py), so the warning
    # says nothing here, in the driver or in the Python workers.
    warnings.filterwarnings("ignore", message=PANDAS_NOTICE, category=FutureWarning)
    settings = {
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.PYTHONWARNINGS": f"ignore:{PANDAS_NOTICE}:FutureWarning",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",  # a progress bar per stage on stderr
        "spark.log.level": "ERROR",
        "spark.sql.shuffle.partitions": "4",
        # Listing many paths as a Spark job (Spark's default above 32) took 6.6 s for 2,000
        # local files, the driver alone 0.4 s.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
        **SCORING_CONF,
        **(conf or {}),
    }
    builder = SparkSession.builder.master(master).appName("skinml")
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
