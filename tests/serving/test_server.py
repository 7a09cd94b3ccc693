"""REST serving of the registered champion: a real `mlflow models serve` process on
127.0.0.1 (MLflow's payload forms, concurrency, bad input, request limits, timeouts) and
`skinml serve`'s own checks."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinml.core.labels import CLASSES, PROBABILITY_COLUMNS
from skinml.serving.ports import free_port
from skinml.serving.server import (
    DIRECT,
    check_model_uri,
    default_workers,
    serve_command,
    stop_server,
)

from ..conftest import NAME, b64, post_json, skinml_in_process
from .conftest import BAD_INPUTS, bad_columns, bomb, encoded

PROBS = list(PROBABILITY_COLUMNS)


def invoke(url: str, payload, raw: bytes | None = None) -> tuple[int, dict]:
    return post_json(f"{url}/invocations", payload, raw)


def ping(url: str) -> int:
    with DIRECT.open(f"{url}/ping", timeout=10) as reply:
        return reply.status


@pytest.fixture(scope="module")
def images(demo_store) -> dict[str, str]:
    paths = sorted(demo_store.folder.glob("*.jpg"))
    jpeg = [b64(p) for p in paths[:4]]
    photo = Image.open(paths[0])
    return {"jpeg": jpeg[0], "batch": jpeg, "png": encoded(photo, "PNG"),
            "rgba": encoded(photo.convert("RGBA"), "PNG"),
            "grey": encoded(photo.convert("L"), "JPEG"),
            "large": encoded(photo.resize((1200, 900)), "JPEG")}


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_all_payload_forms_answer_200_and_match_in_process_predict(champion_server, demo,
                                                                   images, form):
    batch = images["batch"]
    payload = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"],
                                                "data": [[b] for b in batch]}},
        "dataframe_records": {"dataframe_records": [{"image": b} for b in batch]},
        "inputs": {"inputs": {"image": batch}},
    }[form]
    status, body = invoke(champion_server, payload)
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    np.testing.assert_allclose(served[PROBS].sum(axis=1), 1.0, atol=1e-5)
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": batch}))
    assert served["label"].tolist() == local["label"].tolist()
    np.testing.assert_allclose(served[PROBS].to_numpy(), local[PROBS].to_numpy(), atol=1e-5)


def test_concurrent_requests_each_get_their_own_images_answers(champion_server, demo):
    """32 clients at once, each with its own images: the server coalesces their forward
    passes, and every answer is still that request's own, in its order."""
    paths = sorted(demo.folder.glob("*.jpg"))[:40]
    encoded_all = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": encoded_all}))[PROBS].to_numpy()
    requests = [list(range(i, i + 1 + i % 3)) for i in range(32)]  # 1-3 images each

    def ask(rows: list[int]) -> tuple[int, dict]:
        return invoke(champion_server, {"inputs": {"image": [encoded_all[r] for r in rows]}})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, requests))
    for rows, (status, body) in zip(requests, answers, strict=True):
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])[PROBS].to_numpy()
        np.testing.assert_allclose(served, local[rows], atol=1e-6)


def test_one_bad_request_among_concurrent_good_ones_fails_alone(champion_server, images):
    good = {"inputs": {"image": [images["jpeg"]]}}
    bad = {"inputs": {"image": ["@@@ not base64 @@@"]}}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda payload: invoke(champion_server, payload), [good] * 7 + [bad]
                                + [good] * 8))
    assert [status for status, _ in answers] == [200] * 7 + [400] + [200] * 8
    assert answers[7][1]["message"] == "row 0: image is not valid base64"


@pytest.mark.parametrize("kind", ["jpeg", "png", "rgba", "grey", "large"])
def test_any_image_format_and_size_is_served(champion_server, images, kind):
    status, body = invoke(champion_server, {"dataframe_split": {"columns": ["image"],
                                                     "data": [[images[kind]]]}})
    assert status == 200, body
    (row,) = body["predictions"]
    assert row["label"] in CLASSES and row["diagnosis"]
    assert sum(row[p] for p in PROBS) == pytest.approx(1.0, abs=1e-5)
    assert row["confidence"] == pytest.approx(max(row[p] for p in PROBS))


def test_tta_param_is_accepted(champion_server, images):
    status, body = invoke(champion_server, {"dataframe_split": {"columns": ["image"],
                                                     "data": [[images["jpeg"]]]},
                                 "params": {"tta": True}})
    assert status == 200, body


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_400_with_a_reason_and_the_server_lives_on(champion_server, images,
                                                                demo, case):
    columns, reason = bad_columns(case, images["jpeg"])
    name = next(iter(columns))
    payload = {"dataframe_split": {"columns": [name], "data": [[v] for v in columns[name]]}}
    status, body = invoke(champion_server, payload)
    assert status == 400, body
    assert reason in body.get("message", ""), body
    if case != "missing column":  # MLflow's own schema check words that one
        # Our one-line reason, not MLflow's "Failed to predict data '<the request>'".
        assert "Failed to predict data" not in body["message"], body["message"][:300]
        assert len(body["message"]) < 200 and "\n" not in body["message"]
    assert ping(champion_server) == 200


def test_malformed_json_is_400(champion_server):
    status, _ = invoke(champion_server, None, raw=b"{not json")
    assert status == 400
    assert ping(champion_server) == 200


def test_twenty_thousand_rows_are_refused_over_rest_in_one_line(champion_server, images):
    """The server's row limit judges the request before any image is decoded (the same
    rows predict in-process: tests/tracking/test_pyfunc.py)."""
    status, body = invoke(champion_server, {"inputs": {"image": ["x"] * 20_000}})
    assert (status, body["message"]) == (
        400, "request has 20000 images; at most 256 per request (SKINML_SERVE_MAX_ROWS)")
    assert invoke(champion_server, {"inputs": {"image": [images["jpeg"]]}})[0] == 200


@pytest.mark.slow
def test_skinml_serve_enforces_request_limits_and_a_timeout(demo, images):
    """`skinml serve` with two workers and small limits: concurrent requests each get their
    own answers; too many rows or too many bytes are refused before any image is decoded; a
    request slower than --timeout gets 504 while /ping answers."""
    port = free_port()
    log = demo.root / f"serve-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "skinml", "serve", f"models:/{NAME}@champion", "--port",
         str(port), "--timeout", "1", "--workers", "2"],
        env={**os.environ, "MLFLOW_TRACKING_URI": demo.uri, "SKINML_SERVE_MAX_ROWS": "8",
             "SKINML_SERVE_MAX_REQUEST_MB": "0.5"},
        cwd=demo.root, stdout=subprocess.DEVNULL, stderr=open(log, "w"),  # noqa: SIM115
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    batch = images["batch"]
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": batch}))[PROBS].to_numpy()
    try:
        deadline = time.monotonic() + 180
        while "serving models:/" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert ping(url) == 200  # announced only once the server answers
        with ThreadPoolExecutor(16) as pool:  # spread over both workers
            answers = list(pool.map(lambda i: invoke(url, {"inputs": {"image": [batch[i % 4]]}}),
                                    range(16)))
        for i, (status, body) in enumerate(answers):
            assert status == 200, body
            np.testing.assert_allclose(pd.DataFrame(body["predictions"])[PROBS].to_numpy(),
                                       local[[i % 4]], atol=1e-6)
        status, body = invoke(url, {"inputs": {"image": [images["jpeg"]] * 9}})
        assert (status, body["message"]) == (
            400, "request has 9 images; at most 8 per request (SKINML_SERVE_MAX_ROWS)")
        not_an_image = base64.b64encode(os.urandom(450_000)).decode()  # 0.6 MB of base64
        status, body = invoke(url, {"inputs": {"image": [not_an_image]}})
        assert status == 400 and "request holds 0.6 MB of images; at most 0.5 MB" in \
            body["message"], body  # refused by size: it was never decoded
        with ThreadPoolExecutor(1) as pool:
            # 7 x 49 million pixels: over 2 s of decoding, under the 0.5 MB limit
            slow = pool.submit(invoke, url, {"inputs": {"image": [bomb(7000)] * 7}})
            time.sleep(0.3)
            started = time.perf_counter()
            assert ping(url) == 200
            assert time.perf_counter() - started < 1.0  # the server answers while it decodes
            assert slow.result()[0] == 504
        assert invoke(url, {"inputs": {"image": [images["jpeg"]]}})[0] == 200
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: skinml stops the server's workers too
        assert process.wait(timeout=60) == 130
        with pytest.raises(OSError):
            ping(url)
    finally:
        stop_server(process)


def test_serve_workers_share_the_cores_for_torch(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_workers() == 4
    command, env = serve_command("models:/m", "127.0.0.1", 5001, workers=4)
    assert command[command.index("-w") + 1] == "4" and env["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in serve_command("models:/m", "127.0.0.1", 5001)[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stays
    assert serve_command("models:/m", "127.0.0.1", 5001, workers=4)[1]["OMP_NUM_THREADS"] == "3"
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_workers() == 2


def test_a_model_folder_is_checked_on_disk_without_a_tracking_store(tmp_path, monkeypatch):
    """A folder copied from another store serves; MLflow's model info would look its logged
    model up in the store (and make an empty mlflow.db here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    model = tmp_path / "model"
    model.mkdir()
    result = skinml_in_process("serve", str(model), "--port", str(free_port()))
    assert (result.returncode, result.stderr.strip()) == (2, (
        f"error: cannot serve {model}: {model} holds no MLmodel file (not a model folder)"))
    (model / "MLmodel").write_text("model_id: m-0123\nflavors: {}\n")
    check_model_uri(str(model))
    check_model_uri(f"file://{model}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_skinml_serve_refuses_an_unknown_model_or_a_busy_port_in_one_line(demo):
    for uri in ("models:/no-such-model@champion", f"models:/{NAME}@no-such-alias"):
        result = demo.cli_in_process("serve", uri, "--port", str(free_port()))
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            result.stderr.strip().splitlines()[0]] and result.stderr.startswith(
            f"error: cannot serve {uri}: ")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = demo.cli_in_process("serve", f"models:/{NAME}@champion", "--port", str(busy))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{busy}: Address already "
                                      "in use (another program holds the port; choose one "
                                      "with --port)")
