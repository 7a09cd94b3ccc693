"""`skinml serve --mlserver`: a real MLServer on 127.0.0.1 answers our payload on MLflow's
/invocations and on the V2 inference protocol, with the in-process model's probabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml.core.errors import SkinmlError
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.serving.mlserver import MLSERVER_MODEL_NAME, mlserver_folder
from skinml.serving.ports import free_port
from skinml.serving.server import stop_server, wait_ready

from ..conftest import NAME, SAMPLE_IMAGES, b64, image_frame, post_json

pytestmark = pytest.mark.slow  # its MLServer takes over 10 s to start on 2 cores

IMAGES = SAMPLE_IMAGES[:12]


@pytest.fixture(scope="module")
def served(demo_store, tmp_path_factory):
    """The demo store's champion served by `skinml serve --mlserver`, stopped by PID."""
    model_uri = f"models:/{NAME}@champion"
    with demo_store.active():
        expected = mlflow.pyfunc.load_model(model_uri).predict(image_frame(IMAGES))
    root = tmp_path_factory.mktemp("mlserver")
    port = free_port()
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinml", "serve", model_uri, "--port", str(port),
             "--mlserver"],
            env={**os.environ, "MLFLOW_TRACKING_URI": demo_store.uri,
                 "SKINML_CACHE": str(root / "cache")},
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, port, timeout=180)
        yield {"url": f"http://127.0.0.1:{port}", "expected": expected, "root": root}
    finally:
        stop_server(process)


def v2(url: str, images: list[str]) -> tuple[int, dict]:
    return post_json(f"{url}/v2/models/{MLSERVER_MODEL_NAME}/infer", {"inputs": [
        {"name": "image", "shape": [len(images)], "datatype": "BYTES",
         "parameters": {"content_type": "str"}, "data": images}]})


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
    """Adaptive batching merges concurrent requests into one predict and splits it back."""
    with ThreadPoolExecutor(len(IMAGES)) as pool:
        answers = list(pool.map(lambda path: v2(served["url"], [b64(path)]), IMAGES))
    assert [status for status, _ in answers] == [200] * len(IMAGES)
    np.testing.assert_allclose(np.concatenate([v2_probabilities(body) for _, body in answers]),
                               served["expected"][list(PROBABILITY_COLUMNS)], atol=1e-6)


def test_a_bad_row_on_invocations_is_400_with_our_reason(served):
    status, body = post_json(f"{served['url']}/invocations", {"inputs": {"image": ["@@@"]}})
    assert (status, body) == (400, {"error": "row 0: image is not valid base64"})
    assert post_json(f"{served['url']}/invocations",
                {"inputs": {"image": [b64(IMAGES[0])]}})[0] == 200


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
