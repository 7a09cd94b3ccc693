"""Reading runs back: CSV artifacts, the split a run used, the run behind a model URI."""

from __future__ import annotations

import mlflow
import pytest
import torch

from skinml.core.config import ModelConfig, load_config
from skinml.core.errors import SkinmlError
from skinml.data import load_ham10000
from skinml.data.metadata import default_data_dir
from skinml.data.split import split_by_lesion
from skinml.models import build_model
from skinml.tracking import reader
from skinml.tracking.logged_model import log_model, model_meta
from skinml.tracking.writer import training_run

from ..conftest import DEMO


def logged_split(split_seed: int) -> str:
    """A run that logged the bundled sample's split with `split_seed` (as training does)."""
    frame = load_ham10000()
    config = load_config(DEMO, [f"data.split_seed={split_seed}"])
    with training_run(config, f"split-{split_seed}") as run:
        run.log_config(config)
        run.log_data(frame, split_by_lesion(frame, seed=split_seed), str(default_data_dir()))
    return run.run_id


def test_runs_with_the_same_data_and_split_seed_share_their_split(tracking):
    first, again, other = logged_split(0), logged_split(0), logged_split(1)
    assert reader.same_split(first, again)
    assert not reader.same_split(first, other)
    signature = reader.split_signature(mlflow.get_run(first))
    assert [s.split(":")[0] for s in signature] == [
        "ham10000-train", "ham10000-val", "ham10000-test", "data.split_seed"]
    table = reader.run_table(first, "split.csv")
    assert set(table["split"]) == {"train", "val", "test"} and len(table) == 660


def test_a_run_without_logged_data_shares_no_split_and_has_no_tables(tracking):
    with mlflow.start_run() as bare:
        pass
    assert reader.split_signature(mlflow.get_run(bare.info.run_id)) is None
    assert not reader.same_split(bare.info.run_id, bare.info.run_id)
    assert reader.run_table(bare.info.run_id, "split.csv") is None


def test_every_model_uri_form_leads_back_to_its_run(tracking):
    config = ModelConfig(arch="resnext_small", image_size=32)
    torch.manual_seed(0)
    with mlflow.start_run() as run:
        info = log_model(build_model(config).state_dict(), model_meta(config, (40, 53)),
                         str(next(default_data_dir().glob("*.jpg"))))
    version = mlflow.register_model(info.model_uri, "uri-forms")
    mlflow.MlflowClient().set_registered_model_alias("uri-forms", "champion", version.version)
    run_id = run.info.run_id
    for uri in (f"runs:/{run_id}/model", info.model_uri, f"models:/uri-forms/{version.version}",
                "models:/uri-forms@champion"):
        assert reader.source_run_id(uri) == run_id, uri
    with pytest.raises(SkinmlError, match="cannot find the run behind model models:/nope/1"):
        reader.source_run_id("models:/nope/1")
