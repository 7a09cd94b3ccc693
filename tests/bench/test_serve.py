"""`skinml bench serve`'s loads against a real `mlflow models serve` of the champion (its
loads on MLServer: tests/serving/test_mlserver.py)."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner

from skinml.bench.serve import bench_concurrency, bench_paired, serves_v2
from skinml.cli import main

from ..conftest import NAME


@pytest.mark.parametrize("keep_alive", [True, False])
def test_bench_concurrency_counts_every_request_and_no_errors(champion_server, demo,
                                                              keep_alive):
    image = next(iter(sorted(demo.folder.glob("*.jpg"))))
    load = bench_concurrency(image, champion_server, clients=4, requests=12,
                             keep_alive=keep_alive)
    assert load.requests == 12 and len(load.latencies_ms) == 12 and load.errors == 0
    assert load.per_second > 0


def test_a_load_on_an_endpoint_the_server_lacks_counts_errors(champion_server, demo):
    """A load is only as good as its answers: V2 requests to mlflow models serve fail."""
    image = next(iter(sorted(demo.folder.glob("*.jpg"))))
    load = bench_concurrency(image, champion_server, clients=2, requests=4, v2=True)
    assert load.errors == 4 and not serves_v2(champion_server)


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
    machine, server, rest, local, goal, *loads = result.stdout.splitlines()
    assert machine.startswith("machine: ") and server == "a server of your own"
    assert rest.startswith("  REST        p50") and local.startswith("  in-process  p50")
    assert goal.startswith("  REST p50 / in-process p50")
    # /invocations only (no V2 here), each client count with and without keep-alive
    assert [line.split(" requests/s")[0].split()[:-1] for line in loads] == [
        ["/invocations", "2", "clients,", "keep-alive"],
        ["/invocations", "2", "clients,", "new", "connection", "each"]]
    for line in loads:
        assert "over 2 pair(s); goal 70%" in line and line.endswith("errors 0"), line
