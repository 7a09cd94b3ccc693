"""The model card every registered version carries among its model's artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow

from ..conftest import NAME


def test_every_registered_version_carries_a_model_card(demo):
    client = mlflow.MlflowClient(demo.uri)
    with demo.active():
        version = demo.registrations[0].version
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
