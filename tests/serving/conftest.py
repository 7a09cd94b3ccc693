"""What the serving tests share: the hostile requests both servers must refuse in one line,
and a tiny logged model reachable by every kind of model URI."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from ..conftest import isolated_tracking, log_tiny_model


def encoded(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def bomb(side: int = 8000) -> str:
    image = Image.new("L", (side, side))  # 8000: 64 million pixels, a few kB as PNG
    return encoded(image, "PNG")


# case: (columns, the reason the answer holds); None columns are built by `bad_columns`.
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


def bad_columns(case: str, jpeg: str) -> tuple[dict[str, list[str]], str]:
    """The columns of a BAD_INPUTS case (`jpeg`: a good base64 image) and its reason."""
    columns, reason = BAD_INPUTS[case]
    if case == "truncated":
        whole = base64.b64decode(jpeg)
        columns = {"image": [jpeg, base64.b64encode(whole[:len(whole) // 2]).decode()]}
    if case == "pixel bomb":
        columns = {"image": [bomb()]}
    return columns, reason


@dataclass(frozen=True)
class TinyUris:
    """One tiny logged model (registered as `name`, version 1, alias champion) and every
    kind of URI that reaches it."""

    tracking_uri: str
    runs: str  # runs:/<run id>/model
    logged: str  # models:/m-<id>
    version: str  # models:/<name>/1
    alias: str  # models:/<name>@champion
    local: Path  # the model's folder on disk

    @property
    def all(self) -> dict[str, str]:
        return {"runs": self.runs, "logged model": self.logged, "version": self.version,
                "alias": self.alias, "local path": str(self.local)}


@pytest.fixture(scope="session")
def tiny_uris(tmp_path_factory: pytest.TempPathFactory) -> TinyUris:
    root = tmp_path_factory.mktemp("tiny-uris")
    logged = log_tiny_model(root)
    with isolated_tracking(root):
        version = mlflow.register_model(logged.model_uri, "tiny")
        mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version.version)
        run_id = mlflow.models.get_model_info(logged.model_uri).run_id
        local = Path(mlflow.artifacts.download_artifacts(logged.model_uri,
                                                         dst_path=str(root / "local")))
    return TinyUris(logged.tracking_uri, f"runs:/{run_id}/model", logged.model_uri,
                    "models:/tiny/1", "models:/tiny@champion", local)


@pytest.fixture
def broken_model(demo_store, tmp_path: Path) -> Path:
    """The demo champion's folder without its weights: MLflow resolves it, loading it
    fails."""
    with demo_store.active():
        folder = Path(mlflow.artifacts.download_artifacts(
            f"runs:/{demo_store.ranked[0].run_id}/model", dst_path=str(tmp_path / "broken")))
    (folder / "artifacts" / "weights.pt").unlink()
    return folder
