"""Metadata fusion end to end: a fusion model trained by `mlflow run . -P overrides=...`,
registered, served by `mlflow models serve` with and without age, sex and body site,
and compared by `skinml compare` with an image-only model trained alike on the same split."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.evaluation.metrics import balanced_accuracy
from skinml.tracking.logged_model import predict_paths
from skinml.training.choices import load_run_config
from skinml.workflows import image_sets, model_card
from skinml.workflows.registry import register_run
from skinml.workflows.train import train

from .conftest import (
    DEMO,
    Store,
    b64,
    build_folder,
    isolated_tracking,
    post_json,
    served,
    skinml_in_process,
    tiny,
)

pytestmark = pytest.mark.slow  # two trainings, one of them through `mlflow run`

PROBS = list(PROBABILITY_COLUMNS)
NAME = "fusion-classifier"


@dataclass(frozen=True)
class Fusion:
    uri: str
    root: Path
    folder: Path
    image_only: str  # run ids
    fused: str
    images: pd.DataFrame  # a few test-split rows: path, age, sex, localization

    def frame(self, rows: slice = slice(None), columns: tuple[str, ...] = ()) -> pd.DataFrame:
        chosen = self.images.iloc[rows]
        return pd.DataFrame({"image": [b64(p) for p in chosen["path"]],
                             **{c: chosen[c].tolist() for c in columns}})


@pytest.fixture(scope="module")
def fusion(tmp_path_factory) -> Fusion:
    """One image-only run and one concat fusion run, same config, seed and split; the fusion
    run registered as NAME@champion."""
    root = tmp_path_factory.mktemp("fusion")
    with isolated_tracking(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINML_CACHE", str(root / "cache"))
        folder = build_folder(root / "ham", lesions_per_class=5)
        overrides = tiny(folder, "runtime.seed=0")
        image_only = train(load_run_config(DEMO, overrides)).run_id
        fused = train(load_run_config(DEMO, [*overrides, "model.metadata=concat"])).run_id
        register_run(fused, name=NAME)
        test = pd.read_csv(root / "ham" / "HAM10000_metadata.csv")
        test = test.assign(path=[str(folder / f"{i}.jpg") for i in test["image_id"]])
        rows = test.dropna(subset=["age"]).query("sex != 'unknown' and localization != 'unknown'")
        yield Fusion(uri, root, folder, image_only, fused, rows.head(6).reset_index(drop=True))


@pytest.fixture
def model(fusion):
    with isolated_tracking(fusion.root):
        yield mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_the_fusion_run_records_its_choice_and_its_model_takes_optional_metadata(fusion):
    with isolated_tracking(fusion.root):
        run = mlflow.get_run(fusion.fused)
        assert run.data.params["model.metadata"] == "concat"
        assert mlflow.get_run(fusion.image_only).data.params["model.metadata"] == "none"
        schema = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").metadata
        inputs = {spec.name: spec.required for spec in schema.get_input_schema().inputs}
        assert inputs == {"image": True, "age": False, "sex": False, "localization": False}
        card = Path(mlflow.artifacts.download_artifacts(
            f"models:/{NAME}/1/{model_card.card_file('1')}")).read_text()
    assert "optional columns `age` (years, 0-120), `sex` (male, female)" in card
    assert "fused with the image features (`concat`)" in card


def test_without_metadata_is_exactly_all_of_it_missing(fusion, model):
    images = fusion.frame()
    alone = model.predict(images)
    missing = images.assign(age=[None] * len(images), sex=["unknown"] * len(images),
                            localization=[""] * len(images))
    pd.testing.assert_frame_equal(alone, model.predict(missing))
    known = model.predict(fusion.frame(columns=("age", "sex", "localization")))
    assert not np.allclose(known[PROBS], alone[PROBS])  # the columns reach the network
    np.testing.assert_allclose(known[PROBS].sum(axis=1), 1.0, atol=1e-5)


def test_tta_calibration_and_coalesced_callers_keep_each_rows_metadata(fusion, model):
    columns = ("age", "sex", "localization")
    frames = [fusion.frame(slice(i, i + 1), columns) for i in range(len(fusion.images))]
    alone = [model.predict(frame) for frame in frames]
    with ThreadPoolExecutor(len(frames)) as pool:  # merged into shared forward passes
        together = list(pool.map(model.predict, frames))
    for one, merged in zip(alone, together, strict=True):
        np.testing.assert_allclose(merged[PROBS], one[PROBS], atol=1e-6)
    whole = fusion.frame(columns=columns)
    for params in ({"tta": True}, {"calibrated": False}):
        table = model.predict(whole, params=params)
        assert np.allclose(table[PROBS].sum(axis=1), 1.0, atol=1e-5)
        assert not np.allclose(table[PROBS], model.predict(whole)[PROBS])


def test_rest_serves_with_and_without_metadata_and_refuses_bad_values_in_one_line(fusion):
    with isolated_tracking(fusion.root), \
            served(f"models:/{NAME}@champion", _store(fusion)) as url:
        rows = fusion.images.head(2)
        data = [[b64(p), age, sex, site] for p, age, sex, site in
                rows[["path", "age", "sex", "localization"]].itertuples(index=False)]
        columns = ["image", "age", "sex", "localization"]
        status, body = post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": columns, "data": data}})
        assert status == 200, body
        status, alone = post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image"], "data": [[row[0]] for row in data]}})
        assert status == 200, alone
        assert len(alone["predictions"]) == len(body["predictions"]) == 2
        status, partly = post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "age"], "data": [[data[0][0], None], [data[1][0], 61]]}})
        assert status == 200, partly
        for bad, message in [
                (["image", "localization"], "row 1: localization must be one of abdomen"),
                (["image", "age"], "row 1: age must be a number of years or null, got 'old'"),
                (["image", "sex"], "row 1: sex must be one of male, female or unknown, got 7")]:
            value = {"localization": "elbow", "age": "old", "sex": 7}[bad[1]]
            status, body = post_json(f"{url}/invocations", {"dataframe_split": {
                "columns": bad, "data": [[data[0][0], None], [data[1][0], value]]}})
            assert status == 400 and body["message"].startswith(message), body
            assert "\n" not in body["message"] and len(body["message"]) < 200
        assert post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image"], "data": [[data[0][0]]]}})[0] == 200  # it lives on


def test_compare_gives_the_paired_difference_with_its_interval(fusion):
    """On the runs' shared test split, the fusion model scored with each image's metadata."""
    result = _store(fusion).cli_in_process("compare", f"runs:/{fusion.image_only}/model",
                                           f"runs:/{fusion.fused}/model", "--bootstrap", "200")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"Δ = A - B: [+-]\d\.\d{3} \(95 % CI [+-]\d\.\d{3} to [+-]\d\.\d{3}\), "
                     r"paired lesion bootstrap, 200 rounds, on \d+ images / \d+ lesions \(test "
                     r"split shared by runs", result.stdout), result.stdout
    with isolated_tracking(fusion.root):
        images = image_sets.run_split_images(fusion.fused, "test", None)
        model = mlflow.pyfunc.load_model(f"runs:/{fusion.fused}/model")
        with_metadata = predict_paths(model, images["path"].tolist(), clinical=images)
    expected = balanced_accuracy(images["label"].to_numpy(), with_metadata)
    assert f"B  runs:/{fusion.fused}/model: balanced accuracy {expected:.3f}" in result.stdout


def test_a_bad_training_value_stops_a_fusion_run_naming_the_image_and_column(tmp_path):
    folder = build_folder(tmp_path / "ham", lesions_per_class=3)
    metadata = pd.read_csv(folder / "HAM10000_metadata.csv")
    metadata.loc[3, "localization"] = "elbow"
    metadata.to_csv(folder / "HAM10000_metadata.csv", index=False)
    image = metadata.loc[3, "image_id"]
    with isolated_tracking(tmp_path):
        result = skinml_in_process("train", "--config", str(DEMO),
                                   *[f"--set={o}" for o in tiny(folder, "model.metadata=film")])
        assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        f"error: {folder}: image {image}: localization must be one of abdomen, acral, back, "
        "chest, ear, face, foot, genital, hand, lower extremity, neck, scalp, trunk, upper "
        "extremity or unknown, got 'elbow'")


def _store(fusion: Fusion) -> Store:
    return Store(fusion.uri, fusion.root, fusion.folder, [])


def test_mlserver_serves_with_and_without_metadata_on_both_endpoints(fusion):
    rows = fusion.images.head(2)
    images = [b64(p) for p in rows["path"]]
    with isolated_tracking(fusion.root):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        expected = model.predict(fusion.frame(slice(0, 2), ("age", "sex", "localization")))
        alone = model.predict(fusion.frame(slice(0, 2)))
    with served(f"models:/{NAME}@champion", _store(fusion), mlserver=True) as url:
        status, body = post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "age", "sex", "localization"],
            "data": [[image, age, sex, site] for image, (age, sex, site) in
                     zip(images, rows[["age", "sex", "localization"]].itertuples(index=False),
                         strict=True)]}})
        assert status == 200, body
        np.testing.assert_allclose(pd.DataFrame(body["predictions"])[PROBS], expected[PROBS],
                                   atol=1e-6)
        status, body = post_json(f"{url}/v2/models/skin-lesion-classifier/infer", {"inputs": [
            {"name": "image", "shape": [2], "datatype": "BYTES",
             "parameters": {"content_type": "str"}, "data": images},
            {"name": "age", "shape": [2], "datatype": "FP64", "data": rows["age"].tolist()},
            {"name": "sex", "shape": [2], "datatype": "BYTES",
             "parameters": {"content_type": "str"}, "data": rows["sex"].tolist()},
            {"name": "localization", "shape": [2], "datatype": "BYTES",
             "parameters": {"content_type": "str"}, "data": rows["localization"].tolist()}]})
        assert status == 200, body
        outputs = {output["name"]: output["data"] for output in body["outputs"]}
        np.testing.assert_allclose(np.array([outputs[c] for c in PROBS]).T, expected[PROBS],
                                   atol=1e-6)
        status, body = post_json(f"{url}/invocations", {"inputs": {"image": images}})
        assert status == 200, body
        np.testing.assert_allclose(pd.DataFrame(body["predictions"])[PROBS], alone[PROBS],
                                   atol=1e-6)
        status, body = post_json(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "localization"], "data": [[images[0], "elbow"]]}})
        assert status == 400 and body["error"].startswith(
            "row 0: localization must be one of abdomen"), body
        assert "\n" not in body["error"]


def test_predicting_files_with_a_fusion_model_says_they_carry_no_metadata(fusion, model):
    path = fusion.images["path"].iloc[0]
    result = _store(fusion).cli_in_process("predict", f"models:/{NAME}@champion", path, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"INFO: models:/{NAME}@champion reads age, sex and localization; image files "
            "carry none") in result.stderr
    (row,) = json.loads(result.stdout)
    expected = model.predict(fusion.frame(slice(0, 1)))  # the image alone: all missing
    np.testing.assert_allclose([row[c] for c in PROBS], expected[PROBS].iloc[0], atol=1e-6)
