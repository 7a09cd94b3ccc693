"""`skinml serve --mlserver`: a real MLServer on 127.0.0.1 answers our payload on MLflow's
/invocations and on the V2 inference protocol, with the in-process model's probabilities."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml.config import load_config
from skinml.data.metadata import default_data_dir
from skinml.errors import SkinmlError
from skinml.labels import PROBABILITY_COLUMNS
from skinml.serving import (
    DIRECT,
    MLSERVER_MODEL_NAME,
    free_port,
    mlserver_folder,
    stop_server,
    wait_ready,
)
from skinml.train import train

from .conftest import build_folder, isolated_tracking, tiny

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
IMAGES = sorted(default_data_dir().glob("*.jpg"))[:12]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny trained model served by `skinml serve --mlserver`, stopped by PID."""
    root = tmp_path_factory.mktemp("mlserver")
    with isolated_tracking(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        result = train(load_config(DEMO, tiny(build_folder(root / "ham"), "optim.epochs=1")))
        expected = mlflow.pyfunc.load_model(result.model_uri).predict(
            pd.DataFrame({"image": [encoded(p) for p in IMAGES]}))
    port = free_port()
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinml", "serve", result.model_uri, "--port", str(port),
             "--mlserver"],
            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "SKINML_CACHE": str(root / "cache")},
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, port, timeout=180)
        yield {"url": f"http://127.0.0.1:{port}", "expected": expected, "root": root}
    finally:
        stop_server(process)


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def v2(url: str, images: list[str]) -> tuple[int, dict]:
    return post(f"{url}/v2/models/{MLSERVER_MODEL_NAME}/infer", {"inputs": [
        {"name": "image", "shape": [len(images)], "datatype": "BYTES",
         "parameters": {"content_type": "str"}, "data": images}]})


def v2_probabilities(body: dict) -> np.ndarray:
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    return np.array([outputs[column] for column in PROBABILITY_COLUMNS]).T


def test_invocations_answers_our_payload_like_the_in_process_model(served):
    status, body = post(f"{served['url']}/invocations",
                        {"inputs": {"image": [encoded(p) for p in IMAGES[:3]]}})
    assert status == 200, body
    table = pd.DataFrame(body["predictions"])
    expected = served["expected"].iloc[:3]
    assert table["label"].tolist() == expected["label"].tolist()
    columns = list(PROBABILITY_COLUMNS)
    np.testing.assert_allclose(table[columns], expected[columns], atol=1e-6)


def test_v2_inference_protocol_answers_with_the_same_probabilities(served):
    status, body = v2(served["url"], [encoded(p) for p in IMAGES[:3]])
    assert status == 200, body
    np.testing.assert_allclose(v2_probabilities(body),
                               served["expected"][list(PROBABILITY_COLUMNS)].iloc[:3], atol=1e-6)


def test_concurrent_v2_requests_each_get_their_own_images_answer(served):
    """Adaptive batching merges concurrent requests into one predict and splits it back."""
    with ThreadPoolExecutor(len(IMAGES)) as pool:
        answers = list(pool.map(lambda path: v2(served["url"], [encoded(path)]), IMAGES))
    assert [status for status, _ in answers] == [200] * len(IMAGES)
    np.testing.assert_allclose(np.concatenate([v2_probabilities(body) for _, body in answers]),
                               served["expected"][list(PROBABILITY_COLUMNS)], atol=1e-6)


def test_a_bad_row_on_invocations_is_400_with_our_reason(served):
    status, body = post(f"{served['url']}/invocations", {"inputs": {"image": ["@@@"]}})
    assert (status, body) == (400, {"error": "row 0: image is not valid base64"})
    assert post(f"{served['url']}/invocations",
                {"inputs": {"image": [encoded(IMAGES[0])]}})[0] == 200


def test_without_mlserver_installed_the_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlserver_mlflow", None)  # import fails as if absent
    with pytest.raises(SkinmlError, match=r"pip install 'skinml\[mlserver\]'"):
        mlserver_folder("models:/m-0", tmp_path, "127.0.0.1", free_port(), 64, 5)


def test_adaptive_batches_default_to_16_rows_waiting_5_ms(served):
    """MLServer waits for a full batch or the time, so its batch is about the number of
    concurrent clients rather than the in-model coalescer's 64."""
    assert "SKINML_SERVE_MAX_BATCH" not in os.environ
    (settings,) = (served["root"] / "cache" / "mlserver").glob("*/model/model-settings.json")
    written = json.loads(settings.read_text())
    assert (written["max_batch_size"], written["max_batch_time"]) == (16, 0.005)
