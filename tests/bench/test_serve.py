"""`skinml bench serve`'s loads against a real `mlflow models serve` of the champion."""

from __future__ import annotations

import mlflow
from click.testing import CliRunner

from skinml.bench.serve import bench_concurrency, bench_paired
from skinml.cli import main

from ..conftest import NAME


def test_bench_concurrency_counts_every_request_and_no_errors(champion_server, demo):
    image = next(iter(sorted(demo.folder.glob("*.jpg"))))
    load = bench_concurrency(image, champion_server, clients=4, requests=12)
    assert load.requests == 12 and len(load.latencies_ms) == 12 and load.errors == 0
    assert load.per_second > 0


def test_bench_serve_holds_each_load_against_its_own_in_process_rate(champion_server, demo,
                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo.uri)
    image = next(iter(sorted(demo.folder.glob("*.jpg"))))
    model = f"models:/{NAME}@champion"
    paired = bench_paired(mlflow.pyfunc.load_model(model), image, champion_server, clients=2,
                          requests=6, batch=4, repeats=2)
    assert len(paired.loads) == len(paired.ceilings) == 2 and paired.errors == 0
    assert min(paired.ceilings) > 0 and len(paired.shares) == 2 and min(paired.shares) > 0
    assert len(paired.latencies_ms) == 12  # both loads' requests
    result = CliRunner().invoke(main, ["bench", "serve", model, "--url", champion_server, "--image",
                                       str(image), "--requests", "5", "--batch", "4",
                                       "--concurrency", "2", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    # stdout is the table alone, printed after the work; logs go to stderr
    machine, rest, local, goal, line = result.stdout.splitlines()
    assert machine.startswith("machine: ") and rest.startswith("REST        p50")
    assert local.startswith("in-process  p50") and goal.startswith("REST p50 / in-process p50")
    assert line.startswith("  2 clients") and "over 2 pair(s); goal 70%" in line, line
    assert line.endswith("errors 0"), line
