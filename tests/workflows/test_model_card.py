"""The model card every registered version carries among its model's artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from skinml.workflows import model_card

from ..conftest import NAME


def test_every_registered_version_carries_a_model_card(demo):
    client = mlflow.MlflowClient(demo.uri)
    with demo.active():
        version = demo.registrations[0].version
        card_file = client.get_model_version(NAME, version).tags["model_card"]
        assert card_file == f"model_card_v{version}.md"
        path = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}/{card_file}")
        record_file = client.get_model_version(NAME, version).tags["gate.record"]
        record = json.loads(Path(mlflow.artifacts.download_artifacts(
            f"models:/{NAME}/{version}/{record_file}")).read_text())
    card = Path(path).read_text()
    assert record_file == f"gate_v{version}.json" and record["decision"] == "first champion"
    assert f"**first champion**: {record['reason']}" in card and f"`{record_file}`" in card
    for heading in ("## Intended use", "## Not intended for", "## Training data and split",
                    "## Test metrics", "## Promotion gate", "## Subgroups",
                    "## Known limitations"):
        assert heading in card
    assert "not a medical device" in card and "Dermoscopic images only" in card
    assert "balanced accuracy (ISIC 2018 metric)" in card and "95 % CI" in card
    assert "| sex | female |" in card or "| sex | male |" in card


def test_the_card_shows_every_field_of_the_gate_record():
    record = {
        "decision": "not promoted", "forced": False, "min_delta": 0.02,
        "reason": "champion version 4 stays, no evidence of improvement",
        "champion": {"version": "4", "run_id": "c0ffee"},
        "comparison": {
            "balanced_accuracy": {
                "challenger": {"value": 0.61, "ci_low": 0.55, "ci_high": 0.67},
                "champion": {"value": 0.6, "ci_low": 0.54, "ci_high": 0.66},
                "delta": {"value": 0.01, "ci_low": -0.012, "ci_high": 0.034}},
            "set": {"description": "test split shared by runs a and b", "digest": "ab" * 32,
                    "images": 99, "lesions": 66},
            "rounds": 2000, "seed": 7}}
    card = model_card.render("skin", "5", "r1", "run", {}, {}, None, None, record)
    for shown in ("**not promoted**: champion version 4 stays, no evidence of improvement",
                  "`gate_v5.json`", "champion version 4 (run `c0ffee`)",
                  "99 images, 66 lesions: test split shared by runs a and b", "ab" * 32,
                  "| balanced accuracy, this version | 0.610 (95 % CI 0.550-0.670) |",
                  "| balanced accuracy, champion version 4 | 0.600 (95 % CI 0.540-0.660) |",
                  "+0.010 (95 % CI -0.012 to +0.034)", "above +0.020", "2000 rounds, seed 7"):
        assert shown in card, shown
    no_gate = model_card.render("skin", "1", "r1", "run", {}, {}, None, None,
                                {**record, "decision": "first champion", "champion": None,
                                 "comparison": None, "reason": "there was no champion yet"})
    assert "**first champion**: there was no champion yet" in no_gate
    assert "Δ = this version" not in no_gate and "`gate_v1.json`" in no_gate
