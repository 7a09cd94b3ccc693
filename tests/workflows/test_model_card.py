"""The model card every registered version carries among its model's artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from skinml.workflows import model_card

from ..conftest import NAME


def test_every_registered_version_carries_a_model_card(demo):
    with demo.active():
        version = demo.registrations[0].version

        def text(file: str) -> str:
            return Path(mlflow.artifacts.download_artifacts(
                f"models:/{NAME}/{version}/{file}")).read_text()

        card, record = (text(model_card.card_file(version)),
                        json.loads(text(model_card.record_file(version))))
    gate = record["gate"]
    assert gate["decision"] == "first champion"
    assert f"**first champion**: {gate['reason']}" in card
    assert f"`version_v{version}.json`" in card
    assert f"`{record['provenance']['run_id']}`" in card
    for heading in ("## Intended use", "## Not intended for", "## Training data and split",
                    "## Test metrics", "## Promotion gate", "## Provenance", "## Subgroups",
                    "## Known limitations"):
        assert heading in card
    assert "not a medical device" in card and "Dermoscopic images only" in card
    assert "balanced accuracy (ISIC 2018 metric)" in card and "95 % CI" in card
    assert "| sex | female |" in card or "| sex | male |" in card


def test_the_card_shows_every_field_of_the_version_record():
    gate = {
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
    provenance = {
        "run_id": "r1", "run_name": "bright-owl", "arch": "resnext50_32x4d",
        "split_seed": "3", "git_commit": "d00d",
        "datasets": {"ham10000-test": "t1", "ham10000-train": "t0"},
        "val_balanced_accuracy": {"value": 0.585, "ci_low": 0.49, "ci_high": 0.67},
        "test_reported_only": {"balanced_accuracy": {"value": 0.55},
                               "auc": None}}
    record = {"gate": gate, "provenance": provenance}
    card = model_card.render("skin", "5", {}, {}, None, None, record)
    for shown in ("**not promoted**: champion version 4 stays, no evidence of improvement",
                  "`version_v5.json`", "champion version 4 (run `c0ffee`)",
                  "99 images, 66 lesions: test split shared by runs a and b", "ab" * 32,
                  "| balanced accuracy, this version | 0.610 (95 % CI 0.550-0.670) |",
                  "| balanced accuracy, champion version 4 | 0.600 (95 % CI 0.540-0.660) |",
                  "+0.010 (95 % CI -0.012 to +0.034)", "above +0.020", "2000 rounds, seed 7",
                  "Trained in MLflow run `r1` (bright-owl)",
                  "`provenance` in `version_v5.json`",
                  "| MLflow run | `r1` (bright-owl) |", "| architecture | resnext50_32x4d |",
                  "| git commit | `d00d` |", "| split seed | 3 |",
                  "| data digest, ham10000-test | `t1` |", "| data digest, ham10000-train | `t0` |",
                  "| validation balanced accuracy (selection metric) | "
                  "0.585 (95 % CI 0.490-0.670) |",
                  "| test balanced accuracy (reported only) | 0.550 |",
                  "| test macro AUC (reported only) | not recorded |"):
        assert shown in card, shown
    no_gate = model_card.render("skin", "1", {}, {}, None, None, {
        "gate": {**gate, "decision": "first champion", "champion": None, "comparison": None,
                 "reason": "there was no champion yet"},
        "provenance": {**provenance, "git_commit": None}})
    assert "**first champion**: there was no champion yet" in no_gate
    assert "Δ = this version" not in no_gate and "`version_v1.json`" in no_gate
    assert "| git commit | not recorded |" in no_gate
