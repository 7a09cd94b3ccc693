"""Registry to REST: register tiny models, serve the champion with `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from skinml.bench import bench_concurrency, bench_paired
from skinml.cli import main
from skinml.config import load_config
from skinml.labels import CLASSES
from skinml.registry import CHALLENGER, CHAMPION, register_run
from skinml.serving import (
    DIRECT,
    default_workers,
    free_port,
    serve_command,
    start_server,
    stop_server,
    wait_ready,
)
from skinml.train import train

from .conftest import build_folder, isolated_tracking, tiny

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
NAME = "skin-lesion-classifier"
PROBS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tiny trained runs in one tracking store, the better one registered as champion."""
    root = tmp_path_factory.mktemp("registry")
    with isolated_tracking(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        folder = build_folder(root / "ham", lesions_per_class=5)
        runs = [train(load_config(DEMO, tiny(folder, f"runtime.seed={seed}")))
                for seed in (0, 1)]
        # Named by validation, as selection reads it; the gate itself is tested in test_registry.
        better, worse = sorted(runs, key=lambda r: -r.val_balanced_accuracy)
        first = register_run(better.run_id)
        yield {"uri": uri, "root": root, "folder": folder, "better": better, "worse": worse,
               "first": first}


@pytest.fixture(scope="module")
def server(store):
    """`mlflow models serve` of the champion on a free 127.0.0.1 port, stopped by PID."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store["uri"])
        process = start_server(f"models:/{NAME}@{CHAMPION}", port,
                               log_path=store["root"] / "server.log")
    try:
        wait_ready(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def post(url: str, payload, raw: bytes | None = None) -> tuple[int, dict]:
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except json.JSONDecodeError:  # MLflow's 504 is plain text
            return error.code, {"message": text.decode()}


def ping(url: str) -> int:
    with DIRECT.open(f"{url}/ping", timeout=10) as reply:
        return reply.status


def encoded(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def images(store) -> dict[str, str]:
    paths = sorted(store["folder"].glob("*.jpg"))
    jpeg = [base64.b64encode(p.read_bytes()).decode() for p in paths[:4]]
    photo = Image.open(paths[0])
    return {"jpeg": jpeg[0], "batch": jpeg, "png": encoded(photo, "PNG"),
            "rgba": encoded(photo.convert("RGBA"), "PNG"),
            "grey": encoded(photo.convert("L"), "JPEG"),
            "large": encoded(photo.resize((1200, 900)), "JPEG")}


def test_first_registration_becomes_champion_and_challenger(store):
    client = mlflow.MlflowClient(store["uri"])
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    assert str(version.version) == store["first"].version
    assert client.get_model_version_by_alias(NAME, CHALLENGER).version == version.version
    assert version.tags["run_id"] == store["better"].run_id
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(
        store["better"].test["balanced_accuracy"])
    assert "ham10000-train:" in version.tags["dataset_digest"]
    assert "val_balanced_accuracy" in version.tags and version.description
    assert "no champion yet" in store["first"].reason


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_all_payload_forms_answer_200_and_match_in_process_predict(server, store, images, form):
    batch = images["batch"]
    payload = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"],
                                                "data": [[b] for b in batch]}},
        "dataframe_records": {"dataframe_records": [{"image": b} for b in batch]},
        "inputs": {"inputs": {"image": batch}},
    }[form]
    status, body = post(server, payload)
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    np.testing.assert_allclose(served[PROBS].sum(axis=1), 1.0, atol=1e-5)
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}").predict(
        pd.DataFrame({"image": batch}))
    assert served["label"].tolist() == local["label"].tolist()
    np.testing.assert_allclose(served[PROBS].to_numpy(), local[PROBS].to_numpy(), atol=1e-5)


def test_concurrent_requests_each_get_their_own_images_answers(server, store):
    """32 clients at once, each with its own images: the server coalesces their forward
    passes, and every answer is still that request's own, in its order."""
    paths = sorted(store["folder"].glob("*.jpg"))[:40]
    encoded_all = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}").predict(
        pd.DataFrame({"image": encoded_all}))[PROBS].to_numpy()
    requests = [list(range(i, i + 1 + i % 3)) for i in range(32)]  # 1-3 images each

    def ask(rows: list[int]) -> tuple[int, dict]:
        return post(server, {"inputs": {"image": [encoded_all[r] for r in rows]}})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, requests))
    for rows, (status, body) in zip(requests, answers, strict=True):
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])[PROBS].to_numpy()
        np.testing.assert_allclose(served, local[rows], atol=1e-6)


def test_bench_concurrency_counts_every_request_and_no_errors(server, store):
    image = next(iter(sorted(store["folder"].glob("*.jpg"))))
    load = bench_concurrency(image, server, clients=4, requests=12)
    assert load.requests == 12 and len(load.latencies_ms) == 12 and load.errors == 0
    assert load.per_second > 0


def test_bench_serve_holds_each_load_against_its_own_in_process_rate(server, store,
                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    image = next(iter(sorted(store["folder"].glob("*.jpg"))))
    model = f"models:/{NAME}@{CHAMPION}"
    paired = bench_paired(mlflow.pyfunc.load_model(model), image, server, clients=2,
                          requests=6, batch=4, repeats=2)
    assert len(paired.loads) == len(paired.ceilings) == 2 and paired.errors == 0
    assert min(paired.ceilings) > 0 and len(paired.shares) == 2 and min(paired.shares) > 0
    assert len(paired.latencies_ms) == 12  # both loads' requests
    result = CliRunner().invoke(main, ["bench", "serve", model, "--url", server, "--image",
                                       str(image), "--requests", "5", "--batch", "4",
                                       "--concurrency", "2", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    line = result.output.splitlines()[-1]
    assert line.startswith("  2 clients") and "over 2 pair(s); goal 70%" in line, line
    assert line.endswith("errors 0"), line


def test_one_bad_request_among_concurrent_good_ones_fails_alone(server, images):
    good = {"inputs": {"image": [images["jpeg"]]}}
    bad = {"inputs": {"image": ["@@@ not base64 @@@"]}}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda payload: post(server, payload), [good] * 7 + [bad]
                                + [good] * 8))
    assert [status for status, _ in answers] == [200] * 7 + [400] + [200] * 8
    assert answers[7][1]["message"] == "row 0: image is not valid base64"


@pytest.mark.parametrize("kind", ["jpeg", "png", "rgba", "grey", "large"])
def test_any_image_format_and_size_is_served(server, images, kind):
    status, body = post(server, {"dataframe_split": {"columns": ["image"],
                                                     "data": [[images[kind]]]}})
    assert status == 200, body
    (row,) = body["predictions"]
    assert row["label"] in CLASSES and row["diagnosis"]
    assert sum(row[p] for p in PROBS) == pytest.approx(1.0, abs=1e-5)
    assert row["confidence"] == pytest.approx(max(row[p] for p in PROBS))


def test_tta_param_is_accepted(server, images):
    status, body = post(server, {"dataframe_split": {"columns": ["image"],
                                                     "data": [[images["jpeg"]]]},
                                 "params": {"tta": True}})
    assert status == 200, body


def _bomb(side: int = 8000) -> str:
    image = Image.new("L", (side, side))  # 8000: 64 million pixels, a few kB as PNG
    return encoded(image, "PNG")


BAD_INPUTS = {
    "not base64": ({"image": ["@@@ not base64 @@@"]}, "row 0: image is not valid base64"),
    "not an image": ({"image": [base64.b64encode(b"hello, world").decode()]},
                     "row 0: image: cannot decode image"),
    "truncated": (None, "row 1: image: cannot decode image"),
    "pixel bomb": (None, "over the limit of 50,000,000 pixels"),
    "empty string": ({"image": [""]}, "row 0: image must be a non-empty base64 string"),
    "missing column": ({"picture": ["abc"]}, "image"),
    "empty batch": ({"image": []}, "no rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_400_with_a_reason_and_the_server_lives_on(server, images, store, case):
    columns, reason = BAD_INPUTS[case]
    if case == "truncated":
        whole = base64.b64decode(images["jpeg"])
        columns = {"image": [images["jpeg"], base64.b64encode(whole[:len(whole) // 2]).decode()]}
    if case == "pixel bomb":
        columns = {"image": [_bomb()]}
    name = next(iter(columns))
    payload = {"dataframe_split": {"columns": [name], "data": [[v] for v in columns[name]]}}
    status, body = post(server, payload)
    assert status == 400, body
    assert reason in body.get("message", ""), body
    if case != "missing column":  # MLflow's own schema check words that one
        # Our one-line reason, not MLflow's "Failed to predict data '<the request>'".
        assert "Failed to predict data" not in body["message"], body["message"][:300]
        assert len(body["message"]) < 200 and "\n" not in body["message"]
    assert ping(server) == 200


def test_malformed_json_is_400(server):
    status, _ = post(server, None, raw=b"{not json")
    assert status == 400
    assert ping(server) == 200


def run_cli(store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinml", *args], capture_output=True, text=True,
                          timeout=300, cwd=store["root"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]})


def refused(store, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, for commands that must stop with one `error:` line before
    doing any work (no new process to start: these tests stay fast)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(store["root"])
        patch.setenv("MLFLOW_TRACKING_URI", store["uri"])
        result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_register_cli_picks_the_run_with_the_best_validation_score(store):
    result = run_cli(store, "register", "--experiment", "skin-lesion")
    assert result.returncode == 0, result.stderr[-2000:]
    best = max(r.val_balanced_accuracy for r in (store["better"], store["worse"]))
    picked = [r for r in (store["better"], store["worse"])
              if f"from run {r.run_id}" in result.stdout]
    assert len(picked) == 1 and picked[0].val_balanced_accuracy == best
    assert "aliases challenger" in result.stdout


def test_register_cli_unknown_run_is_exit_2(store):
    result = refused(store, "register", "--run-id", "0123456789abcdef")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: run 0123456789abcdef does not exist")


def test_predict_writes_an_isic_submission(store, tmp_path):
    paths = [str(p) for p in sorted(store["folder"].glob("*.jpg"))[:3]]
    out = tmp_path / "submission.csv"
    result = run_cli(store, "predict", f"models:/{NAME}@{CHAMPION}", *paths,
                     "--isic-csv", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    submission = pd.read_csv(out)
    assert list(submission.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert submission["image"].tolist() == [Path(p).stem for p in paths]
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)
    assert [r["image"] for r in json.loads(result.stdout)] == submission["image"].tolist()


def test_predict_names_a_bad_file(store, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = refused(store, "predict", f"models:/{NAME}@{CHAMPION}", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr.strip().splitlines()[-1]


def test_skinml_serve_enforces_request_limits_and_a_timeout(store, images):
    """`skinml serve` with two workers and small limits: concurrent requests each get their
    own answers; too many rows or too many bytes are refused before any image is decoded; a
    request slower than --timeout gets 504 while /ping answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "skinml", "serve", f"models:/{NAME}@{CHAMPION}", "--port",
         str(port), "--timeout", "1", "--workers", "2"],
        env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "SKINML_SERVE_MAX_ROWS": "8",
             "SKINML_SERVE_MAX_REQUEST_MB": "0.5"},
        cwd=store["root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    batch = images["batch"]
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}").predict(
        pd.DataFrame({"image": batch}))[PROBS].to_numpy()
    try:
        wait_ready(process, port)
        with ThreadPoolExecutor(16) as pool:  # spread over both workers
            answers = list(pool.map(lambda i: post(url, {"inputs": {"image": [batch[i % 4]]}}),
                                    range(16)))
        for i, (status, body) in enumerate(answers):
            assert status == 200, body
            np.testing.assert_allclose(pd.DataFrame(body["predictions"])[PROBS].to_numpy(),
                                       local[[i % 4]], atol=1e-6)
        status, body = post(url, {"inputs": {"image": [images["jpeg"]] * 9}})
        assert (status, body["message"]) == (
            400, "request has 9 images; at most 8 per request (SKINML_SERVE_MAX_ROWS)")
        not_an_image = base64.b64encode(os.urandom(450_000)).decode()  # 0.6 MB of base64
        status, body = post(url, {"inputs": {"image": [not_an_image]}})
        assert status == 400 and "request holds 0.6 MB of images; at most 0.5 MB" in \
            body["message"], body  # refused by size: it was never decoded
        with ThreadPoolExecutor(1) as pool:
            # 7 x 49 million pixels: over 2 s of decoding, under the 0.5 MB limit
            slow = pool.submit(post, url, {"inputs": {"image": [_bomb(7000)] * 7}})
            time.sleep(0.3)
            started = time.perf_counter()
            assert ping(url) == 200
            assert time.perf_counter() - started < 1.0  # the server answers while it decodes
            assert slow.result()[0] == 504
        assert post(url, {"inputs": {"image": [images["jpeg"]]}})[0] == 200
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


def test_skinml_serve_refuses_an_unknown_model_or_a_busy_port_in_one_line(store):
    for uri in ("models:/no-such-model@champion", f"models:/{NAME}@no-such-alias"):
        result = refused(store, "serve", uri, "--port", str(free_port()))
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            result.stderr.strip().splitlines()[0]] and result.stderr.startswith(
            f"error: cannot serve {uri}: ")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = refused(store, "serve", f"models:/{NAME}@{CHAMPION}", "--port", str(busy))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{busy}: Address already "
                                      "in use (another program holds the port; choose one "
                                      "with --port)")


def test_reading_commands_leave_no_tracking_store_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    for args in (["serve", "models:/m@champion"], ["predict", "models:/m@champion", "x.jpg"],
                 ["evaluate", "models:/m@champion"], ["register", "--experiment", "x"],
                 ["compare", "models:/a/1", "models:/b/1"],
                 ["explain", "models:/m@champion", str(store_image()), "--out", "o.png"]):
        result = CliRunner().invoke(main, args)  # in-process: each stops before MLflow
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip() == (
            f"error: no MLflow tracking store at {tmp_path / 'mlflow.db'}: run this in the "
            "folder you trained in, or set MLFLOW_TRACKING_URI"), args
        assert list(tmp_path.iterdir()) == [], args


def store_image() -> Path:
    return next(iter(sorted(Path(__file__).resolve().parents[1].glob("skinml/sample/*.jpg"))))


def test_mlflow_run_register_entry_point(store):
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["mlflow", "run", str(repo), "-e", "register", "--env-manager", "local",
         "-P", f"run_id={store['better'].run_id}"],
        capture_output=True, text=True, timeout=300, cwd=store["root"],
        env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"from run {store['better'].run_id}" in result.stdout
    # The champion's own model again: Δ is exactly 0, so the champion stays.
    assert "no evidence of improvement" in result.stdout
    champion = mlflow.MlflowClient(store["uri"]).get_model_version_by_alias(NAME, CHAMPION)
    assert str(champion.version) == str(store["first"].version)


def test_every_registered_version_carries_a_model_card(store):
    client = mlflow.MlflowClient(store["uri"])
    with isolated_tracking(store["root"]):
        version = store["first"].version
        card_file = client.get_model_version(NAME, version).tags["model_card"]
        assert card_file == f"model_card_v{version}.md"
        path = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}/{card_file}")
    card = Path(path).read_text()
    for heading in ("## Intended use", "## Not intended for", "## Training data and split",
                    "## Test metrics", "## Promotion gate", "## Subgroups",
                    "## Known limitations"):
        assert heading in card
    assert "not a medical device" in card and "Dermoscopic images only" in card
    assert "balanced accuracy (ISIC 2018 metric)" in card and "95 % CI" in card
    assert "| sex | female |" in card or "| sex | male |" in card


# --- skinml evaluate / explain on the registered model ---------------------------------

SCORER = ("import pandas; pandas.DataFrame.applymap = pandas.DataFrame.map; "
          "from isic_challenge_scoring.__main__ import cli; cli()")


def test_evaluate_reproduces_the_training_runs_test_metrics(store):
    result = run_cli(store, "evaluate", f"models:/{NAME}@{CHAMPION}", "--bootstrap", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balanced accuracy (ISIC 2018 metric)" in result.stdout
    run_id = result.stdout.split("evaluation run ")[1].split()[0]
    client = mlflow.MlflowClient(store["uri"])
    run = client.get_run(run_id)
    assert run.data.tags["skinml.role"] == "evaluation"
    # Evaluations live beside the training experiment, each with a description for the UI.
    judged = client.get_experiment(run.info.experiment_id)
    trained = client.get_experiment_by_name("skin-lesion")
    assert judged.name == "skin-lesion-evaluations"
    assert "skinml evaluate" in judged.tags["mlflow.note.content"]
    assert "best_val_balanced_accuracy" in trained.tags["mlflow.note.content"]
    assert not client.search_runs([trained.experiment_id],
                                  "tags.`skinml.role` = 'evaluation'")
    assert run.data.tags["skinml.model_uri"] == f"models:/{NAME}@{CHAMPION}"
    trained = client.get_run(run.data.tags["skinml.source_run_id"]).data.metrics
    # the served model on the run's own test split gives the run's test numbers
    for key in ("test_balanced_accuracy", "test_auc", "test_ece", "test_temperature"):
        assert run.data.metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    m = run.data.metrics
    assert m["test_balanced_accuracy_ci_low"] <= m["test_balanced_accuracy"] <= \
        m["test_balanced_accuracy_ci_high"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"evaluation_report.md", "gradcam_grid.png", "reliability_diagram.png",
            "subgroups.csv", "subgroups.png", "confusion_matrix.png", "predictions.csv",
            "classification_report.txt"} <= artifacts
    report = Path(client.download_artifacts(run_id, "evaluation_report.md")).read_text()
    assert "## Subgroups" in report and "lesion" in report


def test_evaluate_on_the_training_folder_warns_that_it_is_not_a_test_score(store):
    result = run_cli(store, "evaluate", f"models:/{NAME}@{CHAMPION}", "--split", "all",
                     "--data-dir", str(store["folder"]), "--bootstrap", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = store["better"].run_id
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"are in the train/val split of run {run_id}" in warnings[0]
    assert "not a test score" in warnings[0]


@pytest.fixture(scope="module")
def isic_folder(store, tmp_path_factory) -> tuple[Path, Path]:
    """ISIC 2018 Task 3 layout: a folder of JPEGs and the one-hot ground truth CSV."""
    from skinml.data.synth import write_synthetic

    synthetic = write_synthetic(tmp_path_factory.mktemp("isic") / "synth", 42, seed=4,
                                width=64, height=48, progress=False)
    metadata = pd.read_csv(synthetic / "HAM10000_metadata.csv")
    images = synthetic.parent / "ISIC2018_Task3_Test_Input"
    images.mkdir()
    for image_id in metadata["image_id"]:
        (synthetic / f"{image_id}.jpg").rename(images / f"{image_id}.jpg")
    truth = pd.DataFrame({"image": metadata["image_id"],
                          **{c: (metadata["dx"] == c.lower()).astype(float)
                             for c in ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    truth_csv = synthetic.parent / "ISIC2018_Task3_Test_GroundTruth.csv"
    truth.to_csv(truth_csv, index=False)
    return images, truth_csv


def test_evaluate_on_an_isic_2018_folder_agrees_with_the_official_scorer(store, isic_folder,
                                                                         tmp_path):
    images, truth_csv = isic_folder
    result = run_cli(store, "evaluate", f"models:/{NAME}@{CHAMPION}", "--split", "isic",
                     "--data-dir", str(images), "--truth", str(truth_csv), "--bootstrap", "20",
                     "--tta")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("evaluation run ")[1].split()[0]
    client = mlflow.MlflowClient(store["uri"])
    run = client.get_run(run_id)
    assert run.data.params["eval.tta"] == "True"
    ours = run.data.metrics["isic_balanced_accuracy"]
    predictions = pd.read_csv(client.download_artifacts(run_id, "predictions.csv"))
    submission = pd.DataFrame({"image": predictions["image_id"],
                               **{c: predictions[f"p_{c.lower()}"] for c in
                                  ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    submission.to_csv(tmp_path / "submission.csv", index=False)
    scored = subprocess.run([sys.executable, "-c", SCORER, "-o", "json", "classification",
                             str(truth_csv), str(tmp_path / "submission.csv")],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr
    official = json.loads(scored.stdout)["aggregate"]["balanced_accuracy"]
    assert ours == pytest.approx(official, abs=1e-9)


def test_evaluate_refuses_a_bad_ground_truth_file(store, isic_folder, tmp_path):
    images, truth_csv = isic_folder
    bad = tmp_path / "truth.csv"
    pd.read_csv(truth_csv).drop(columns="VASC").to_csv(bad, index=False)
    result = refused(store, "evaluate", f"models:/{NAME}@{CHAMPION}", "--split", "isic",
                     "--data-dir", str(images), "--truth", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}: missing column(s) VASC"


def test_explain_writes_an_overlay_of_the_images_size(store, tmp_path):
    photo = Image.open(next(store["folder"].glob("*.jpg"))).resize((301, 217))
    source = tmp_path / "odd.png"
    photo.save(source)
    out = tmp_path / "overlay.png"
    figure = tmp_path / "figure.png"
    result = run_cli(store, "explain", f"models:/{NAME}@{CHAMPION}", str(source), "--out",
                     str(out), "--figure", str(figure))
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (301, 217)
    assert any(c in result.stdout for c in CLASSES)
    # 32 px training: the CAM comes from a 1x1 map, and the output says so.
    assert result.stdout.rstrip().endswith("(Grad-CAM from a 1x1 feature map)")
    assert Image.open(figure).size[0] > 301  # the framed figure, with its colour scale


def test_predict_isic_csv_is_accepted_by_the_official_scorer(store, tmp_path):
    metadata = pd.read_csv(store["folder"] / "HAM10000_metadata.csv")
    one_per_class = metadata.groupby("dx").head(1)
    paths = [str(store["folder"] / f"{i}.jpg") for i in one_per_class["image_id"]]
    submission = tmp_path / "submission.csv"
    result = run_cli(store, "predict", f"models:/{NAME}@{CHAMPION}", *paths,
                     "--isic-csv", str(submission))
    assert result.returncode == 0, result.stderr[-2000:]
    truth = pd.DataFrame({"image": one_per_class["image_id"],
                          **{c: (one_per_class["dx"] == c.lower()).astype(float)
                             for c in ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    scored = subprocess.run([sys.executable, "-c", SCORER, "classification",
                             str(tmp_path / "truth.csv"), str(submission)],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert "balanced_accuracy" in scored.stdout
