"""The docs and the demo config quote what the main job gives, recorded by
`scripts/demo_numbers.py` for the code as it is now."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("demo_numbers",
                                                  ROOT / "scripts" / "demo_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()
record = json.loads(script.RECORD.read_text())


def test_record_is_for_this_code():
    assert record["code_digest"] == script.code_digest(), (
        "the training code, demo config or sample changed since the demo numbers were "
        "recorded: run `python scripts/demo_numbers.py` and update docs/ and demo.yaml")


def test_training_sources_follow_imports():
    names = {p.relative_to(ROOT).as_posix() for p in script.training_sources()}
    assert {"skinml/workflows/train.py", "skinml/training/engine.py",
            "skinml/training/recipe.py", "skinml/tracking/pyfunc.py",
            "skinml/tracking/logged_model.py", "skinml/data/augment.py"} <= names
    assert not {name for name in names if name.startswith(("skinml/cli/", "skinml/bench/",
                                                           "skinml/workflows/tuning/"))}


def test_the_serving_page_quotes_the_recorded_sample_prediction():
    page = (ROOT / "docs" / "registry-and-serving.md").read_text()
    block = re.search(r'```json\n(\{"predictions".*?)```', page, re.S).group(1)
    quoted = json.loads(block)["predictions"][0]
    recorded = record["sample_prediction"]
    assert quoted["label"] == recorded["label"]
    for key, value in quoted.items():
        if isinstance(value, float):
            assert value == round(recorded[key], 3), key


def test_demo_config_quotes_the_recorded_metrics():
    config = ROOT / "skinml" / "core" / "configs" / "demo.yaml"
    header = "".join(line for line in config.read_text().splitlines(True)
                     if line.startswith("#"))
    m = record["metrics"]
    expected = [
        f"best epoch {int(m['best_epoch'])}",
        f"validation balanced accuracy {m['best_val_balanced_accuracy']:.2f}",
        f"balanced accuracy {m['test_balanced_accuracy']:.2f} (95 % CI "
        f"{m['test_balanced_accuracy_ci_low']:.2f}-{m['test_balanced_accuracy_ci_high']:.2f})",
        f"macro AUC {m['test_auc']:.2f} ({m['test_auc_ci_low']:.2f}-{m['test_auc_ci_high']:.2f})",
    ]
    text = " ".join(header.replace("#", " ").split())
    for phrase in expected:
        assert phrase in text, phrase
