"""Scoring benchmarks: decode threads, memory against the number of rows, and
`skinml predict --out` against the model's in-process batch ceiling.

Run on full-size synthetic JPEGs (600x450, as HAM10000's), so decoding weighs what it
weighs on real archives. Memory is measured in a fresh process per row count: the peak
resident set while `predict` runs, against the resident set just before (input built).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinml.core.errors import SkinmlError
from skinml.data.image_files import ImageSources
from skinml.data.synth import write_synthetic
from skinml.inference.decoder import DECODE_WORKERS_ENV
from skinml.inference.pyfunc import CHUNK
from skinml.inference.requests import encode_image
from skinml.tracking.logged_model import load_model
from skinml.workflows.score import FILE_CHUNK, ScoreOptions, score_files


def synthetic_images(folder: Path, count: int) -> list[Path]:
    """`count` 600x450 synthetic JPEGs in `folder` (made when it does not exist)."""
    if not folder.exists():
        write_synthetic(folder, count, progress=False)
    images = sorted(folder.glob("*.jpg"))
    if len(images) < count:
        raise SkinmlError(f"{folder} holds {len(images)} images, not {count}: remove it or "
                          "choose another --work-dir")
    return images[:count]


def encoded_rows(images: list[Path], rows: int) -> pd.DataFrame:
    """`rows` rows cycling over `images`, each its own base64 string (as a real input)."""
    raws = [path.read_bytes() for path in images]
    return pd.DataFrame({"image": [encode_image(raws[i % len(raws)])
                                   for i in range(rows)]})


@dataclass(frozen=True)
class DecodeRates:
    threads: int
    one_thread: float  # images/s in-process with one decode thread
    all_threads: float


def decode_rates(model_uri: str, images: list[Path], rows: int = 512) -> DecodeRates:
    """In-process images/s of one `rows`-row predict call, one decode thread vs one per core."""
    frame = encoded_rows(images, rows)
    threads = min(8, os.cpu_count() or 1)
    rates = []
    for workers in (1, threads):
        os.environ[DECODE_WORKERS_ENV] = str(workers)  # read when the model loads
        try:
            model = load_model(model_uri)
        finally:
            del os.environ[DECODE_WORKERS_ENV]
        model.predict(frame.iloc[:CHUNK])  # warm
        rates.append(max(rows / _seconds(lambda m=model: m.predict(frame)) for _ in range(2)))
    return DecodeRates(threads, *rates)


@dataclass(frozen=True)
class MemoryUse:
    rows: int
    input_mb: float  # the base64 strings
    before_mb: float  # resident set with the model loaded and the input built
    peak_mb: float  # highest resident set while predicting
    seconds: float

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.before_mb


def memory_use(model_uri: str, folder: Path, rows: int) -> MemoryUse:
    """Peak memory of in-process predict of `rows` rows, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-m", "skinml.bench.scoring", model_uri,
                           str(folder), str(rows)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {done.stderr.strip()[-2000:]}")
    return MemoryUse(**json.loads(done.stdout.strip().splitlines()[-1]))


def mlflow_predict_memory(model_uri: str, images: list[Path], rows: int, work: Path
                          ) -> MemoryUse:
    """Peak memory of `mlflow models predict` of a `rows`-row JSON file (its own process:
    parsing the JSON input is part of what it holds)."""
    frame = encoded_rows(images, rows)
    request = work / f"rows-{rows}.json"
    request.write_text(json.dumps({"dataframe_split": frame.to_dict(orient="split")}))
    input_mb = frame["image"].str.len().sum() / 1e6
    del frame
    command = [sys.executable, "-m", "mlflow", "models", "predict", "-m", model_uri, "-i",
               str(request), "-o", str(work / "predictions.json"), "-t", "json",
               "--env-manager", "local"]
    seconds, peak_mb = run_measured("mlflow models predict", command,
                                   work / "mlflow-predict.log")
    request.unlink()
    return MemoryUse(rows, input_mb, before_mb=float("nan"), peak_mb=peak_mb,
                     seconds=seconds)


def run_measured(what: str, command: list[str], log: Path) -> tuple[float, float]:
    """Run `command` to its end: (seconds, peak resident MB). Its stderr goes to `log`, not
    a pipe nobody reads while waiting (a child writing more than the pipe holds would block
    forever); a failure raises with the log's tail."""
    started = time.perf_counter()
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        reason = log.read_bytes()[-2000:].decode(errors="replace")
        raise RuntimeError(f"{what} failed: {reason}")
    return seconds, usage.ru_maxrss / 1024


@dataclass(frozen=True)
class PredictRate:
    images: int
    predict: list[float]  # `skinml predict --out` files/s, one per pair
    # in-process images/s on the same images already in memory, in calls of the size
    # `skinml predict` makes (FILE_CHUNK rows): what is left is reading, encoding, writing
    ceiling: list[float]

    @property
    def shares(self) -> list[float]:
        return [p / c for p, c in zip(self.predict, self.ceiling, strict=True)]


def predict_rate(model_uri: str, folder: Path, images: int, pairs: int = 2) -> PredictRate:
    """`skinml predict --out` over `folder` against the in-process ceiling, in pairs run
    one after the other (so a slower spell of the machine hits both)."""
    model = load_model(model_uri)
    frame = encoded_rows(sorted(folder.glob("*.jpg"))[:images], images)
    model.predict(frame.iloc[:CHUNK])  # warm

    def ceiling() -> None:
        for start in range(0, len(frame), FILE_CHUNK):
            model.predict(frame.iloc[start:start + FILE_CHUNK])

    sources = ImageSources.resolve([str(folder)])
    rates, ceilings = [], []
    for _ in range(pairs):
        ceilings.append(images / _seconds(ceiling))
        with tempfile.TemporaryDirectory() as tmp:
            result = score_files(ScoreOptions(model_uri=model_uri, sources=sources,
                                              out=Path(tmp) / "out", progress=False))
        rates.append(result.per_second)
    return PredictRate(images, rates, ceilings)


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _resident_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_here(model_uri: str, folder: Path, rows: int) -> MemoryUse:
    model = load_model(model_uri)
    frame = encoded_rows(sorted(folder.glob("*.jpg")), rows)
    model.predict(frame.iloc[:2])  # torch's first-call allocations are not the rows'
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) starts again from the current resident set
    before = _resident_mb("VmRSS")
    seconds = _seconds(lambda: model.predict(frame))
    return MemoryUse(rows, frame["image"].str.len().sum() / 1e6, before,
                     _resident_mb("VmHWM"), seconds)


if __name__ == "__main__":  # memory_use's fresh interpreter: MODEL_URI FOLDER ROWS
    measured = _measure_here(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(measured.__dict__))
