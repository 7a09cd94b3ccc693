"""`skinml serve --mlserver`: a real MLServer on 127.0.0.1 answers our payload on MLflow's
/invocations and on the V2 inference protocol, with the in-process model's probabilities,
refuses bad and oversized requests on both in one line, and reports a model that does not
load in one line."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from skinml.bench.serve import bench_paired
from skinml.cli import main
from skinml.core.errors import SkinmlError
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.serving.mlserver import MLSERVER_MODEL_NAME, mlserver_folder
from skinml.serving.ports import free_port
from skinml.serving.server import DIRECT, stop_server

from ..conftest import NAME, SAMPLE_IMAGES, b64, image_frame, post_json
from .conftest import BAD_INPUTS, bad_columns

pytestmark = pytest.mark.slow  # its MLServer takes over 10 s to start on 2 cores

IMAGES = SAMPLE_IMAGES[:12]


@pytest.fixture(scope="module")
def served(demo_store, tmp_path_factory):
    """The demo store's champion, by its run (runs:/<id>/model: the URI kind that downloads
    into a subfolder), served by `skinml serve --mlserver` with limits of 8 rows and 0.5 MB
    per request; stopped by PID. `ping_when_announced`: /ping's status the moment the
    command said "serving ... at"."""
    model_uri = f"runs:/{demo_store.ranked[0].run_id}/model"
    with demo_store.active():
        assert mlflow.models.get_model_info(model_uri).model_id == mlflow.models.get_model_info(
            f"models:/{NAME}@champion").model_id
        expected = mlflow.pyfunc.load_model(model_uri).predict(image_frame(SAMPLE_IMAGES[:16]))
    root = tmp_path_factory.mktemp("mlserver")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinml", "serve", model_uri, "--port", str(port),
             "--mlserver"],
            env={**os.environ, "MLFLOW_TRACKING_URI": demo_store.uri,
                 "SKINML_CACHE": str(root / "cache"), "SKINML_SERVE_MAX_ROWS": "8",
                 "SKINML_SERVE_MAX_REQUEST_MB": "0.5"},
            cwd=root, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while f"serving {model_uri} at {url} (MLServer)" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, \
                log.read_text()[-3000:]
            time.sleep(0.05)
        with DIRECT.open(f"{url}/ping", timeout=10) as reply:
            ping = reply.status
        yield {"url": url, "expected": expected, "root": root, "log": log,
               "model_uri": model_uri, "ping_when_announced": ping}
    finally:
        stop_server(process)


V2_PATH = f"/v2/models/{MLSERVER_MODEL_NAME}/infer"


def v2(url: str, images: list[str], name: str = "image") -> tuple[int, dict]:
    return post_json(f"{url}{V2_PATH}", {"inputs": [
        {"name": name, "shape": [len(images)], "datatype": "BYTES",
         "parameters": {"content_type": "str"}, "data": images}]})


def invocations(url: str, images: list[str], name: str = "image") -> tuple[int, dict]:
    return post_json(f"{url}/invocations",
                     {"dataframe_split": {"columns": [name], "data": [[i] for i in images]}})


ENDPOINTS = {"invocations": invocations, "v2": v2}


def settled(log: Path) -> int:
    """The log's size once earlier requests' lines have arrived (the server's output passes
    through `skinml serve` on its way to the file)."""
    size = -1
    while size != log.stat().st_size:
        size = log.stat().st_size
        time.sleep(0.3)
    return size


def refusals(log: Path, before: int, expected: int) -> list[str]:
    """The server's log lines about refused requests written after byte `before`, once
    `expected` of them are there (and a moment later, in case of more)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in log.read_bytes()[before:].decode().splitlines()
                 if "refused" in line]
        if len(lines) >= expected:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    return [line for line in log.read_bytes()[before:].decode().splitlines()
            if "refused" in line]


def v2_probabilities(body: dict) -> np.ndarray:
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    return np.array([outputs[column] for column in PROBABILITY_COLUMNS]).T


def test_invocations_answers_our_payload_like_the_in_process_model(served):
    status, body = post_json(f"{served['url']}/invocations",
                        {"inputs": {"image": [b64(p) for p in IMAGES[:3]]}})
    assert status == 200, body
    table = pd.DataFrame(body["predictions"])
    expected = served["expected"].iloc[:3]
    assert table["label"].tolist() == expected["label"].tolist()
    columns = list(PROBABILITY_COLUMNS)
    np.testing.assert_allclose(table[columns], expected[columns], atol=1e-6)


def test_v2_inference_protocol_answers_with_the_same_probabilities(served):
    status, body = v2(served["url"], [b64(p) for p in IMAGES[:3]])
    assert status == 200, body
    np.testing.assert_allclose(v2_probabilities(body),
                               served["expected"][list(PROBABILITY_COLUMNS)].iloc[:3], atol=1e-6)


def test_concurrent_v2_requests_each_get_their_own_images_answer(served):
    """The runtime merges concurrent requests into one predict and splits it back."""
    with ThreadPoolExecutor(len(IMAGES)) as pool:
        answers = list(pool.map(lambda path: v2(served["url"], [b64(path)]), IMAGES))
    assert [status for status, _ in answers] == [200] * len(IMAGES)
    np.testing.assert_allclose(np.concatenate([v2_probabilities(body) for _, body in answers]),
                               served["expected"][list(PROBABILITY_COLUMNS)].iloc[:len(IMAGES)],
                               atol=1e-6)


def test_a_bad_row_on_invocations_is_400_with_our_reason(served):
    status, body = post_json(f"{served['url']}/invocations", {"inputs": {"image": ["@@@"]}})
    assert (status, body) == (400, {"error": "row 0: image is not valid base64"})
    assert post_json(f"{served['url']}/invocations",
                {"inputs": {"image": [b64(IMAGES[0])]}})[0] == 200


def test_without_mlserver_installed_the_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlserver_mlflow", None)  # import fails as if absent
    with pytest.raises(SkinmlError, match=r"pip install 'skinml\[mlserver\]'"):
        mlserver_folder("models:/m-0", tmp_path, "127.0.0.1", free_port())


def test_the_model_batches_mlserver_requests_as_under_mlflow_models_serve(served):
    """One batching path: MLServer's adaptive batching stays off and the runtime keeps no
    batcher of its own; concurrent requests meet in the model's coalescer."""
    (settings,) = (served["root"] / "cache" / "mlserver").glob("*/model/model-settings.json")
    written = json.loads(settings.read_text())
    extra = written["parameters"]["extra"]
    assert (extra["max_rows"], extra["max_request_mb"]) == (8, 0.5)  # as the fixture set
    assert "max_batch_size" not in written and "max_batch_time" not in written
    assert set(extra) == {"max_rows", "max_request_mb"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_request_is_a_one_line_400_and_one_log_line_on_both_endpoints(served, case,
                                                                            endpoint):
    """The reasons `mlflow models serve` gives (tests/serving/test_server.py), never a
    traceback; the server lives on."""
    columns, reason = bad_columns(case, b64(IMAGES[0]))
    (name, values), = columns.items()
    before = settled(served["log"])
    status, body = ENDPOINTS[endpoint](served["url"], values, name)
    assert status == 400 and list(body) == ["error"], body
    assert reason in body["error"] and "\n" not in body["error"], body
    assert len(body["error"]) < 200 and "Traceback" not in body["error"]
    lines = refusals(served["log"], before, 1)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.endswith(f"400 {body['error']}"), line
    assert ENDPOINTS[endpoint](served["url"], [b64(IMAGES[0])])[0] == 200


@pytest.mark.parametrize("path", ["/invocations", V2_PATH])
def test_a_body_that_is_not_json_is_a_one_line_400(served, path):
    status, body = post_json(f"{served['url']}{path}", raw=b"{not json")
    assert status == 400 and "valid JSON" in body["error"] and "\n" not in body["error"], body
    status, body = post_json(f"{served['url']}{path}", raw=b'{"inputs": "x" }')
    assert status == 400 and "\n" not in body["error"] and len(body["error"]) < 200, body


def test_twenty_thousand_rows_are_refused_while_concurrent_small_requests_are_answered(
        served):
    """32 one-image requests at once are answered under the 8-row limit: it judges each
    client's request, not the batches they merge into (test_mlserver_runtime.py)."""
    small = [(endpoint, [b64(path)]) for endpoint in ENDPOINTS for path in SAMPLE_IMAGES[:16]]
    large = [(endpoint, ["x"] * 20_000) for endpoint in ENDPOINTS]
    with ThreadPoolExecutor(len(small) + len(large)) as pool:
        answers = list(pool.map(lambda job: ENDPOINTS[job[0]](served["url"], job[1]),
                                small + large))
    refused = "request has 20000 images; at most 8 per request (SKINML_SERVE_MAX_ROWS)"
    assert answers[len(small):] == [(400, {"error": refused})] * 2
    expected = served["expected"][list(PROBABILITY_COLUMNS)].to_numpy()
    for i, (status, body) in enumerate(answers[:len(small)]):
        assert status == 200, body
        served_probabilities = (v2_probabilities(body) if "outputs" in body else
                                pd.DataFrame(body["predictions"])[list(PROBABILITY_COLUMNS)])
        np.testing.assert_allclose(served_probabilities, expected[[i % 16]], atol=1e-6)


def test_bench_serve_measures_both_endpoints_with_and_without_keep_alive(served, demo):
    """`skinml bench serve`'s loads on MLServer (the loads on mlflow models serve:
    tests/bench/test_serve.py)."""
    model = mlflow.pyfunc.load_model(served["model_uri"])
    paired = bench_paired(model, IMAGES[0], served["url"], clients=2, requests=6, batch=4,
                          repeats=1, v2=True, keep_alive=False)
    assert paired.errors == 0 and len(paired.latencies_ms) == 6 and min(paired.shares) > 0
    result = CliRunner().invoke(main, ["bench", "serve", served["model_uri"], "--url",
                                       served["url"], "--image", str(IMAGES[0]), "--requests",
                                       "5", "--batch", "4", "--concurrency", "2",
                                       "--repeats", "1"])
    assert result.exit_code == 0, result.output
    loads = result.stdout.splitlines()[-4:]
    assert [line.split()[0] for line in loads] == ["/invocations"] * 2 + ["V2"] * 2
    assert ["keep-alive" in line for line in loads] == [True, False] * 2
    assert all(line.endswith("errors 0") for line in loads), loads


def test_serving_is_announced_once_the_model_answers(served):
    assert served["ping_when_announced"] == 200


def test_nine_rows_or_too_many_megabytes_are_refused_on_both_endpoints(served):
    not_an_image = base64.b64encode(os.urandom(450_000)).decode()  # 0.6 MB of base64
    for ask in ENDPOINTS.values():
        assert ask(served["url"], [b64(IMAGES[0])] * 9) == (400, {"error": (
            "request has 9 images; at most 8 per request (SKINML_SERVE_MAX_ROWS)")})
        assert ask(served["url"], [not_an_image]) == (413, {"error": (
            "request holds 0.6 MB of images; at most 0.5 MB per request "
            "(SKINML_SERVE_MAX_REQUEST_MB)")})


def test_a_model_that_does_not_load_is_one_line_and_exit_2(broken_model, tmp_path):
    """Not "serving ... at" and a dead server: the runtime's reason, and the server's whole
    output kept in a file. A model folder needs no tracking store (none is made)."""
    result = subprocess.run(
        [sys.executable, "-m", "skinml", "serve", str(broken_model), "--port",
         str(free_port()), "--mlserver"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "SKINML_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot serve {broken_model}: the model did not load: ")
    assert "weights.pt" in line and "(the server's output: " in line
    log = Path(line.rsplit("(the server's output: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()  # the whole story is kept for whoever needs it
    assert not (tmp_path / "mlflow.db").exists()
