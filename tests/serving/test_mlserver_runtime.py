"""skinml's MLServer runtime in this process (no HTTP): the folder `skinml serve --mlserver`
prepares for every kind of model URI, the limits judged on each client's request before
requests merge, and the one-line reasons (the real server: test_mlserver.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import mlflow
import numpy as np
import pytest
from mlserver.errors import MLServerError
from mlserver.repository import SchemalessModelRepository
from mlserver.types import InferenceRequest, RequestInput

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.inference.requests import RequestLimits
from skinml.serving.mlserver import MLSERVER_MODEL_NAME, mlserver_folder
from skinml.serving.mlserver_entry import describe
from skinml.serving.mlserver_internals import loaded_pyfunc, missing_internals
from skinml.serving.mlserver_runtime import SkinmlRuntime, one_line
from skinml.serving.ports import free_port

from ..conftest import SAMPLE_IMAGES, b64, image_frame

IMAGES = SAMPLE_IMAGES[:16]
KINDS = ("runs", "logged model", "version", "alias", "local path")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_model_uri_gives_a_folder_mlserver_loads(tiny_uris, tmp_path,
                                                                 monkeypatch, kind):
    """runs:/ URIs (and local paths) download into a subfolder, models:/ ones flat; the
    folder always holds the model and its settings at model/."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_uris.tracking_uri)
    folder = mlserver_folder(tiny_uris.all[kind], tmp_path / "served", "127.0.0.1",
                             free_port())
    settings = json.loads((folder / "model" / "model-settings.json").read_text())
    assert settings["name"] == MLSERVER_MODEL_NAME and settings["parameters"]["uri"] == "./"
    served = mlflow.pyfunc.load_model(str(folder / "model"))
    assert served.metadata.model_id == tiny_uris.logged.removeprefix("models:/")
    assert list(served.predict(image_frame(IMAGES[:2])).columns)[:2] == ["label", "diagnosis"]
    assert sorted(path.name for path in folder.iterdir()) == ["model", "settings.json"]


@pytest.fixture(scope="module")
def runtime(tiny_uris, tmp_path_factory) -> SkinmlRuntime:
    """The runtime on the tiny model, as MLServer loads it, with limits of 8 rows and
    0.5 MB per request."""
    folder = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tiny_uris.tracking_uri)
        mlserver_folder(tiny_uris.logged, folder, "127.0.0.1", free_port(),
                        RequestLimits(max_rows=8, max_mb=0.5))
    (settings,) = asyncio.run(SchemalessModelRepository(str(folder)).list())
    served = SkinmlRuntime(settings)
    served.ready = asyncio.run(served.load())
    return served


def v2_request(images: list[str]) -> InferenceRequest:
    return InferenceRequest(inputs=[RequestInput(
        name="image", shape=[len(images)], datatype="BYTES",
        parameters={"content_type": "str"}, data=images)])


def probabilities(response) -> np.ndarray:
    outputs = {output.name: output.data.root for output in response.outputs}
    return np.array([outputs[column] for column in PROBABILITY_COLUMNS]).T


def test_limits_judge_each_request_and_the_models_coalescer_merges_the_passes(
        runtime, tiny_uris, monkeypatch):
    """16 one-image requests at once share a few forward passes in the model's coalescer
    (the one batching path) though 8 rows is the limit; 20,000 rows and 0.6 MB are refused
    on their own (400, 413)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_uris.tracking_uri)
    expected = mlflow.pyfunc.load_model(tiny_uris.logged).predict(image_frame(IMAGES))
    coalesce = loaded_pyfunc(runtime).unwrap_python_model().coalesce
    passes: list[int] = []
    forward = coalesce.run

    def slow(rows, key):  # a pass long enough for the other requests to queue behind it
        passes.append(len(rows))
        time.sleep(0.05)
        return forward(rows, key)

    monkeypatch.setattr(coalesce, "run", slow)
    not_an_image = base64.b64encode(os.urandom(450_000)).decode()  # 0.6 MB of base64

    async def clients() -> list:
        requests = [v2_request([b64(path)]) for path in IMAGES]
        requests += [v2_request(["x"] * 20_000), v2_request([not_an_image])]
        return await asyncio.gather(*(runtime.predict(r) for r in requests),
                                    return_exceptions=True)

    *answers, rows, size = asyncio.run(clients())
    assert sum(passes) == 16 and len(passes) <= 4, passes
    np.testing.assert_allclose(np.concatenate([probabilities(a) for a in answers]),
                               expected[list(PROBABILITY_COLUMNS)], atol=1e-6)
    assert (rows.status_code, str(rows)) == (
        400, "request has 20000 images; at most 8 per request (SKINML_SERVE_MAX_ROWS)")
    assert (size.status_code, str(size)) == (
        413, "request holds 0.6 MB of images; at most 0.5 MB per request "
             "(SKINML_SERVE_MAX_REQUEST_MB)")


def test_a_refusal_is_one_line_without_the_request(runtime):
    with pytest.raises(MLServerError) as refused:
        asyncio.run(runtime.predict(InferenceRequest(inputs=[RequestInput(
            name="picture", shape=[1], datatype="BYTES", parameters={"content_type": "str"},
            data=["abc" * 1000])])))
    assert (refused.value.status_code, str(refused.value)) == (
        400, "Model is missing inputs ['image']. Note that there were extra inputs: "
             "['picture'].")
    assert one_line("Failed to enforce schema of data '  picture\n0  abc' with schema "
                    "'['image': string]'. Error: Model is missing inputs ['image'].") == \
        "Model is missing inputs ['image']."
    assert len(one_line("x" * 10_000)) == 500


def test_a_v2_body_that_is_no_inference_request_is_described_without_its_values():
    assert describe([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                      "ctx": {"error": "Expecting value"}, "input": {}}]) == \
        "request body is not valid JSON: Expecting value"
    assert describe([{"type": "missing", "loc": ("body", "inputs", 0, "shape"),
                      "msg": "Field required", "input": {"data": "x" * 1000}},
                     {"type": "missing", "loc": ("body", "inputs", 0, "datatype"),
                      "msg": "Field required", "input": {}}]) == \
        "request body: inputs.0.shape: Field required (and 1 more)"


def test_the_installed_mlserver_mlflow_has_what_the_runtime_reads():
    """The runtime reads two of MLflowRuntime's private attributes, in one module
    (`serving/mlserver_internals.py`): this fails when an upgrade drops them."""
    assert missing_internals() == []
