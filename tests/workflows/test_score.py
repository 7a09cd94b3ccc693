"""`skinml predict --out`: every input file exactly once, in parts, across kills and resumes;
unreadable files listed with their reason; a resume that would mix inputs is refused."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinml.core.errors import SkinmlError
from skinml.core.labels import PROBABILITY_COLUMNS
from skinml.data.image_files import ImageSources
from skinml.inference.requests import encode_image
from skinml.tracking.logged_model import example_jpeg, load_model
from skinml.workflows import score
from skinml.workflows.score import MANIFEST, PARTS, ScoreOptions, score_files

from ..conftest import REPO, SAMPLE_IMAGES, LoggedModel, log_tiny_model, skinml_in_process

PROBS = list(PROBABILITY_COLUMNS)


@pytest.fixture(scope="module")
def model(tiny_model: LoggedModel) -> LoggedModel:
    return tiny_model


@pytest.fixture(autouse=True)
def _tracking(model: LoggedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", model.tracking_uri)


def archive(root: Path, images: int) -> Path:
    """`images` small JPEGs (ten real ones, repeated) in two folders, plus a file that is
    not an image and an empty one."""
    small = [example_jpeg(str(path), 53) for path in SAMPLE_IMAGES[:10]]
    for i in range(images):
        path = root / f"batch_{i % 2}" / f"ISIC_{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(small[i % 10])
    (root / "batch_0" / "ISIC_0000001_notes.jpg").write_text("<html>not an image</html>")
    (root / "batch_1" / "ISIC_0000002_empty.jpg").write_bytes(b"")
    return root


def options(model: LoggedModel, sources: list[str], out: Path, **more) -> ScoreOptions:
    return ScoreOptions(model_uri=model.model_uri, sources=ImageSources.resolve(sources),
                        out=out, progress=False, **more)


def read_predictions(out: Path) -> pd.DataFrame:
    """Every committed part of an output folder, as one table (parts past the manifest's
    count are a killed run's, not committed)."""
    manifest = json.loads((out / MANIFEST).read_text())
    fmt = manifest["identity"]["output_format"]
    parts = sorted((out / PARTS).glob(f"part-*.{fmt}"))[:manifest["progress"]["parts"]]
    tables = [pd.read_csv(path, dtype={"path": str, "image": str}) if fmt == "csv"
              else pd.read_parquet(path) for path in parts]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def errors_of(out: Path) -> list[list[str]]:
    with open(out / "errors.csv") as handle:
        return list(csv.reader(handle))


def test_every_file_once_in_order_and_the_bad_ones_in_errors_csv(model, tmp_path):
    folder = archive(tmp_path / "archive", 150)
    listing = tmp_path / "more.txt"
    listing.write_text("archive/batch_0/ISIC_0000000.jpg\narchive/batch_0/gone.jpg\n")
    sources = ImageSources.resolve([str(folder)], [str(listing)])
    result = score_files(ScoreOptions(model_uri=model.model_uri, sources=sources,
                                      out=tmp_path / "out", part_size=64, progress=False))
    table = read_predictions(tmp_path / "out")
    good = [p for p in sources.paths() if "notes" not in p and "empty" not in p
            and "gone" not in p]
    assert table["path"].tolist() == good  # 150 + the listed one, in input order
    assert table["image"].tolist() == [Path(p).stem for p in good]
    assert (result.images, result.errors, result.parts) == (151, 3, 3)
    assert sorted(len(pd.read_csv(p)) for p in (tmp_path / "out/predictions").iterdir()) == \
        [25, 63, 63]  # parts of 64 input files (26 in the last), each less one that failed
    assert errors_of(tmp_path / "out") == [
        ["path", "error"],
        [str(folder / "batch_0/ISIC_0000001_notes.jpg"),
         "cannot decode image (not a JPEG, PNG or other known image format)"],
        [str(folder / "batch_1/ISIC_0000002_empty.jpg"), "empty file"],
        [str(tmp_path / "archive/batch_0/gone.jpg"),
         "cannot read the file (No such file or directory)"]]
    served = load_model(model.model_uri).predict(pd.DataFrame(
        {"image": [encode_image(Path(p).read_bytes()) for p in good[:12]]}))
    np.testing.assert_allclose(table[PROBS].to_numpy()[:12], served[PROBS].to_numpy(),
                               atol=1e-6)


def test_parquet_parts_and_the_isic_csv(model, tmp_path):
    folder = archive(tmp_path / "archive", 40)
    score_files(options(model, [str(folder)], tmp_path / "csv", part_size=16))
    score_files(options(model, [str(folder)], tmp_path / "pq", fmt="parquet", part_size=16,
                        isic_csv=tmp_path / "isic.csv"))
    parquet, plain = read_predictions(tmp_path / "pq"), read_predictions(tmp_path / "csv")
    assert sorted(p.name for p in (tmp_path / "pq/predictions").iterdir())[0] == \
        "part-000000.parquet"
    assert parquet["path"].tolist() == plain["path"].tolist()
    np.testing.assert_allclose(parquet[PROBS].to_numpy(), plain[PROBS].to_numpy(), atol=1e-9)
    isic = pd.read_csv(tmp_path / "isic.csv")
    assert list(isic.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert isic["image"].tolist() == parquet["image"].tolist()
    np.testing.assert_allclose(isic["MEL"], parquet["p_mel"])


def test_a_resume_drops_what_came_after_the_last_commit(model, tmp_path, monkeypatch):
    """Killed after a part and its errors were written but before the manifest recorded
    them: the resumed run redoes that part, and the output equals an uninterrupted one."""
    folder = archive(tmp_path / "archive", 100)
    score_files(options(model, [str(folder)], tmp_path / "whole", part_size=20))
    write_manifest, calls = score._write_manifest, []

    def killed_at_the_fourth_commit(out, identity, progress):
        calls.append(progress.parts)
        if len(calls) == 5:  # the first call writes the empty manifest
            raise KeyboardInterrupt
        write_manifest(out, identity, progress)

    with monkeypatch.context() as patch:
        patch.setattr(score, "_write_manifest", killed_at_the_fourth_commit)
        with pytest.raises(KeyboardInterrupt):
            score_files(options(model, [str(folder)], tmp_path / "out", part_size=20))
    parts = sorted(p.name for p in (tmp_path / "out/predictions").iterdir())
    assert parts[-1] == "part-000003.csv"  # written, never committed
    result = score_files(options(model, [str(folder)], tmp_path / "out", part_size=20,
                                 resume=True))
    assert result.resumed_at == 60
    whole, resumed = read_predictions(tmp_path / "whole"), read_predictions(tmp_path / "out")
    assert resumed["path"].tolist() == whole["path"].tolist()
    assert resumed["path"].is_unique
    np.testing.assert_allclose(resumed[PROBS].to_numpy(), whole[PROBS].to_numpy(), atol=1e-6)
    assert errors_of(tmp_path / "out") == errors_of(tmp_path / "whole")
    again = score_files(options(model, [str(folder)], tmp_path / "out", part_size=20,
                                resume=True))
    assert (again.images, again.resumed_at) == (100, 102)  # complete: nothing to do


def test_a_resume_that_would_mix_inputs_or_options_is_refused(model, tmp_path):
    folder = archive(tmp_path / "archive", 30)
    out = tmp_path / "out"
    score_files(options(model, [str(folder)], out, part_size=10))
    with pytest.raises(SkinmlError, match="holds predictions of an earlier run .32 files, "
                                          "complete.: pass --resume"):
        score_files(options(model, [str(folder)], out, part_size=10))
    with pytest.raises(SkinmlError, match="was written with --part-size 10, not 20"):
        score_files(options(model, [str(folder)], out, part_size=20, resume=True))
    with pytest.raises(SkinmlError, match="was written with --tta False, not True"):
        score_files(options(model, [str(folder)], out, part_size=10, tta=True, resume=True))
    manifest = (out / "manifest.json").read_text()
    moved = json.loads(manifest)
    model_id, moved["identity"]["model"] = moved["identity"]["model"], "m-another"
    (out / "manifest.json").write_text(json.dumps(moved))  # as if an alias had moved
    with pytest.raises(SkinmlError, match="written with the model .the URI now names another. "
                                          f"m-another, not {model_id}"):
        score_files(options(model, [str(folder)], out, part_size=10, resume=True))
    (out / "manifest.json").write_text(manifest)
    (folder / "batch_0" / "ISIC_0000000a.jpg").write_bytes(
        (folder / "batch_0" / "ISIC_0000000.jpg").read_bytes())  # sorts among the done ones
    with pytest.raises(SkinmlError, match="the input files are not those of the run"):
        score_files(options(model, [str(folder)], out, part_size=10, resume=True))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SkinmlError, match="not an empty folder, and it holds no skinml"):
        score_files(options(model, [str(folder)], tmp_path / "mine"))
    with pytest.raises(SkinmlError, match="holds no skinml predictions to continue"):
        score_files(options(model, [str(folder)], tmp_path / "new", resume=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _start(model: LoggedModel, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skinml", "predict", model.model_uri, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri})


def _after_parts(process: subprocess.Popen, out: Path, parts: int) -> None:
    """Wait until the manifest records `parts` parts (the run is half-way)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifest = out / "manifest.json"
        if manifest.is_file() and f'"parts": {parts},' in manifest.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"never reached part {parts}: {process.communicate()}")


@pytest.mark.slow
def test_killed_half_way_then_resumed_every_image_exactly_once(model, tmp_path):
    folder = archive(tmp_path / "archive", 2000)
    out = tmp_path / "out"
    args = [str(folder / "batch_*" / "*.jpg"), "--out", str(out), "--part-size", "100"]
    process = _start(model, *args)
    _after_parts(process, out, 4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = read_predictions(out)
    assert 400 <= len(done) + 2 < 2002  # some parts done, not all
    resumed = skinml_in_process("predict", model.model_uri, *args, "--resume", cwd=REPO,
                                env={"MLFLOW_TRACKING_URI": model.tracking_uri})
    assert resumed.returncode == 0, resumed.stderr
    table = read_predictions(out)
    expected = [p for p in ImageSources.resolve([args[0]]).paths()
                if "notes" not in p and "empty" not in p]
    assert table["path"].tolist() == expected and table["path"].is_unique
    assert [row[0] for row in errors_of(out)[1:]] == [
        str(folder / "batch_0/ISIC_0000001_notes.jpg"),
        str(folder / "batch_1/ISIC_0000002_empty.jpg")]
    assert resumed.stdout.startswith("predicted 2000 images into")
    assert "after the" in resumed.stdout


@pytest.mark.slow  # two scoring processes: 12-15 s
def test_a_log_file_gets_no_download_bar(model, tmp_path):
    """stderr to a file or a pipe: MLflow's artifact download bar stays off, in the CLI and
    in library use alike (a bar in a log is a line per redraw)."""
    environment = {k: v for k, v in os.environ.items()
                   if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    process = subprocess.run(
        [sys.executable, "-m", "skinml", "predict", model.model_uri, str(SAMPLE_IMAGES[0])],
        capture_output=True, text=True, cwd=REPO,
        env={**environment, "MLFLOW_TRACKING_URI": model.tracking_uri}, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "Downloading artifacts" not in process.stderr
    library = subprocess.run(
        [sys.executable, "-c", "import os, skinml.tracking; "
         "print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'])"],
        capture_output=True, text=True, env=environment, timeout=120)
    assert library.stdout.strip() == "false"


@pytest.mark.slow
def test_ctrl_c_while_the_model_predicts_exits_130_without_an_abort(tmp_path):
    """SIGINT while a forward pass runs in the model's batching thread: the worker finishes
    its batch before the interpreter ends (it used to die inside the pass: "terminate called
    without an active exception", SIGABRT), and the last line names the command that
    continues."""
    demo_sized = log_tiny_model(tmp_path / "store", image_size=96)
    env = {**os.environ, "MLFLOW_TRACKING_URI": demo_sized.tracking_uri}
    sample = SAMPLE_IMAGES[0].parent
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        process = subprocess.Popen(
            [sys.executable, "-m", "skinml", "predict", demo_sized.model_uri, str(sample),
             "--out", str(out), "--part-size", "64"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        _after_parts(process, out, 1)
        time.sleep(0.2 * attempt)
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr[-2000:]
        assert "terminate called" not in stderr and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == (
            f"interrupted: continue with: skinml predict {demo_sized.model_uri} {sample} "
            f"--out {out} --part-size 64 --resume")


@pytest.mark.slow  # mlflow models predict's two interpreters: 12-17 s
def test_mlflow_models_predict_takes_more_rows_than_a_server_would(model, tmp_path):
    """`mlflow models predict` runs the model in its own process, where no request limit
    applies: 300 rows (over a server's 256) predict, equal to in-process predict."""
    small = [encode_image(example_jpeg(str(path), 53))
             for path in SAMPLE_IMAGES[:10]]
    rows = pd.DataFrame({"image": [small[i % 10] for i in range(300)]})
    request = tmp_path / "rows.json"
    request.write_text(json.dumps({"dataframe_split": rows.to_dict(orient="split")}))
    answer = tmp_path / "predictions.json"
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", model.model_uri, "-i",
         str(request), "-o", str(answer), "-t", "json", "--env-manager", "local"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri})
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = pd.DataFrame(json.loads(answer.read_text())["predictions"])
    local = load_model(model.model_uri).predict(rows)
    assert len(predicted) == 300
    np.testing.assert_allclose(predicted[PROBS].to_numpy(), local[PROBS].to_numpy(), atol=1e-6)
