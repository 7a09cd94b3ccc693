"""`skinml bench predict`: decode threads, memory per row count (in-process and `mlflow
models predict`) and `skinml predict --out` against the in-process ceiling, on a tiny model."""

from __future__ import annotations

import sys

import pytest

from ..conftest import skinml_in_process


@pytest.mark.slow
def test_bench_predict_prints_its_table_after_the_work(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_model.tracking_uri)
    result = skinml_in_process("bench", "predict", tiny_model.model_uri, "--images", "64",
                               "--rows", "50", "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    machine, decode, *memory, predict = result.stdout.splitlines()
    assert machine.startswith("machine: ") and "600x450 synthetic JPEGs" in machine
    assert decode.startswith("decode ") and " with 1 thread, " in decode
    assert [line.split()[:4] for line in memory] == [
        ["memory", "in-process", "50", "rows:"], ["memory", "mlflow", "models", "predict"]]
    assert "peak while predicting" in memory[0] and " 50 rows: input " in memory[1]
    assert predict.startswith("predict    skinml predict --out ") and "target >= 90%" in predict
    assert len(list((tmp_path / "work" / "synthetic-64").glob("*.jpg"))) == 64  # kept


def test_bench_predict_row_counts_are_checked_first():
    result = skinml_in_process("bench", "predict", "--rows", "1000,lots")
    assert result.returncode == 2 and "'1000,lots' is not a list of numbers" in result.stderr


CHATTY_FAILURE = ("import sys; sys.stderr.write('x' * 300_000 + '\\nthe reason\\n'); "
                  "sys.exit(3)")


@pytest.mark.timeout(60)  # a child that fills a pipe nobody reads would block forever
def test_a_measured_child_that_writes_a_lot_and_fails_raises_with_its_last_words(tmp_path):
    from skinml.bench.scoring import run_measured

    with pytest.raises(RuntimeError, match=r"(?s)chatty failed: x+\nthe reason"):
        run_measured("chatty", [sys.executable, "-c", CHATTY_FAILURE], tmp_path / "log")
    seconds, peak_mb = run_measured("quiet", [sys.executable, "-c", "pass"], tmp_path / "log")
    assert seconds > 0 and peak_mb > 1
