"""`skinml register`, `predict` and `explain` on the shared demo store (and `mlflow run -e
register`), and every command that only reads: one line and no new tracking store when
there is none."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from skinml.cli import main
from skinml.core.labels import CLASSES
from skinml.workflows.registry import CHAMPION

from ..conftest import ISIC_SCORER, NAME, REPO, SAMPLE_IMAGES, Store


@dataclass(frozen=True)
class IsicPredict:
    """`skinml predict --isic-csv --json` of one image of each class."""

    metadata: pd.DataFrame  # the images' rows, in the order they were given
    paths: list[str]
    submission: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def isic_predict(demo_store: Store, tmp_path_factory: pytest.TempPathFactory) -> IsicPredict:
    """One real `skinml predict` process for the module's two checks of its submission."""
    metadata = pd.read_csv(demo_store.folder / "HAM10000_metadata.csv").groupby("dx").head(1)
    paths = [str(demo_store.folder / f"{i}.jpg") for i in metadata["image_id"]]
    submission = tmp_path_factory.mktemp("isic") / "submission.csv"
    result = demo_store.cli_in_process("predict", f"models:/{NAME}@champion", *paths,
                                       "--isic-csv", str(submission), "--json")
    return IsicPredict(metadata, paths, submission, result)


def test_predict_writes_an_isic_submission(isic_predict):
    result, paths = isic_predict.result, isic_predict.paths
    assert result.returncode == 0, result.stderr[-2000:]
    submission = pd.read_csv(isic_predict.submission)
    assert list(submission.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert submission["image"].tolist() == [Path(p).stem for p in paths]
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)
    assert [r["image"] for r in json.loads(result.stdout)] == submission["image"].tolist()


def test_predict_names_a_bad_file(demo, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = demo.cli_in_process("predict", f"models:/{NAME}@champion", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr.strip().splitlines()[-1]


def test_explain_writes_an_overlay_of_the_images_size(demo, tmp_path):
    photo = Image.open(next(demo.folder.glob("*.jpg"))).resize((301, 217))
    source = tmp_path / "odd.png"
    photo.save(source)
    out = tmp_path / "overlay.png"
    figure = tmp_path / "figure.png"
    result = demo.cli_in_process("explain", f"models:/{NAME}@champion", str(source), "--out",
                                 str(out), "--figure", str(figure))
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (301, 217)
    assert any(c in result.stdout for c in CLASSES)
    # 32 px training: the CAM comes from a 1x1 map, and the output says so.
    assert result.stdout.rstrip().endswith("(Grad-CAM from a 1x1 feature map)")
    assert Image.open(figure).size[0] > 301  # the framed figure, with its colour scale


def test_predict_isic_csv_is_accepted_by_the_official_scorer(isic_predict, tmp_path):
    assert isic_predict.result.returncode == 0, isic_predict.result.stderr[-2000:]
    one_per_class = isic_predict.metadata
    truth = pd.DataFrame({"image": one_per_class["image_id"],
                          **{c: (one_per_class["dx"] == c.lower()).astype(float)
                             for c in ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]}})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    scored = subprocess.run([sys.executable, "-c", ISIC_SCORER, "classification",
                             str(tmp_path / "truth.csv"), str(isic_predict.submission)],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert "balanced_accuracy" in scored.stdout


def test_reading_commands_leave_no_tracking_store_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    for args in (["serve", "models:/m@champion"], ["predict", "models:/m@champion", "x.jpg"],
                 ["evaluate", "models:/m@champion"], ["register", "--experiment", "x"],
                 ["compare", "models:/a/1", "models:/b/1"],
                 ["explain", "models:/m@champion", str(SAMPLE_IMAGES[0]), "--out", "o.png"]):
        result = CliRunner().invoke(main, args)  # in-process: each stops before MLflow
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip() == (
            f"error: no MLflow tracking store at {tmp_path / 'mlflow.db'}: run this in the "
            "folder you trained in, or set MLFLOW_TRACKING_URI"), args
        assert list(tmp_path.iterdir()) == [], args


def test_reading_commands_in_an_empty_store_name_it_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. a `skinml train` started here by mistake made it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.MlflowClient().search_experiments()  # the tables exist; no run, no model
    hint = (f"(read sqlite:///{tmp_path / 'mlflow.db'}, which holds no runs and no models: "
            "run this where you trained, or set MLFLOW_TRACKING_URI to that store)")
    champion = "models:/skin-lesion-classifier@champion"
    missing = "0123456789abcdef0123456789abcdef"
    for args, start in (
            (["serve", champion], f"error: cannot serve {champion}: "),
            (["predict", champion, str(SAMPLE_IMAGES[0])], f"error: cannot load model {champion}"),
            (["evaluate", champion], f"error: cannot load model {champion}: "),
            (["compare", champion, f"runs:/{missing}/model"], f"error: no model at {champion}"),
            (["compare", f"runs:/{missing}/model", champion], f"error: run {missing} does not "),
            (["register"], "error: experiment 'skin-lesion' does not exist"),
            (["train", "--resume", missing], f"error: --resume {missing}: no such run")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip()
        assert line.startswith(start) and line.endswith(hint) and "\n" not in line, args


@pytest.mark.parametrize("args, reason", [
    (["serve", "--mlserver", "--timeout", "5"], "is for mlflow models serve, not MLServer"),
    (["serve", "--mlserver", "--workers", "2"], "is for mlflow models serve, not MLServer"),
])
def test_option_mistakes_of_serve_are_exit_2_before_any_work(args, reason):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and reason in result.output


def test_register_cli_picks_the_run_with_the_best_validation_score(demo):
    result = demo.cli_in_process("register", "--experiment", "skin-lesion")
    assert result.returncode == 0, result.stderr[-2000:]
    best = max(r.val_balanced_accuracy for r in (demo.ranked[0], demo.ranked[1]))
    picked = [r for r in (demo.ranked[0], demo.ranked[1])
              if f"from run {r.run_id}" in result.stdout]
    assert len(picked) == 1 and picked[0].val_balanced_accuracy == best
    assert "aliases challenger" in result.stdout


def test_register_cli_unknown_run_is_exit_2(demo):
    result = demo.cli_in_process("register", "--run-id", "0123456789abcdef")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: run 0123456789abcdef does not exist")


@pytest.mark.slow
def test_mlflow_run_register_entry_point(demo, capfd):
    with demo.active():  # mlflow.run: what `mlflow run` calls, in this interpreter
        submitted = mlflow.run(str(REPO), "register", env_manager="local",
                               parameters={"run_id": demo.ranked[0].run_id})
    assert submitted.get_status() == "FINISHED"
    stdout = capfd.readouterr().out  # the entry point's process writes to this fd
    assert f"from run {demo.ranked[0].run_id}" in stdout
    # The champion's own model again: Δ is exactly 0, so the champion stays.
    assert "no evidence of improvement" in stdout
    champion = mlflow.MlflowClient(demo.uri).get_model_version_by_alias(NAME, CHAMPION)
    assert str(champion.version) == str(demo.registrations[0].version)


def test_with_mlflow_tracking_uri_set_the_hint_points_at_it_not_at_setting_it(tmp_path,
                                                                              monkeypatch):
    store = tmp_path / "empty.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    mlflow.set_tracking_uri(None)
    missing = CliRunner().invoke(main, ["register"])
    assert missing.exit_code == 2 and not store.exists()
    assert "MLFLOW_TRACKING_URI" in missing.stderr and "or set" not in missing.stderr
    mlflow.MlflowClient().search_experiments()  # now it exists, and holds nothing
    empty = CliRunner().invoke(main, ["register"])
    assert empty.exit_code == 2
    assert "from MLFLOW_TRACKING_URI" in empty.stderr and "or set" not in empty.stderr
