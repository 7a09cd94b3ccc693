"""The main job's numbers: the docs and the demo config quote the record (one entry per CPU
type, `scripts/demo_numbers.py`), and the rule `scripts/demo_numbers.py --check` applies
to a new run (CI runs that check after the suite: it trains the demo for 2-4 minutes)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("demo_numbers",
                                                  ROOT / "scripts" / "demo_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()
runs = script.recorded_runs()


QUOTED = "AMD EPYC, x86_64 AVX512"  # the CPU type whose run the docs quote in full


def span(key: str) -> tuple[float, float]:
    return script.span(key, runs)


def test_the_serving_page_quotes_a_recorded_sample_prediction():
    page = (ROOT / "docs" / "registry-and-serving.md").read_text()
    block = re.search(r'```json\n(\{"predictions".*?)```', page, re.S).group(1)
    quoted = json.loads(block)["predictions"][0]
    (recorded,) = [run["sample_prediction"] for run in runs if run["cpu"] == QUOTED]
    assert quoted["label"] == recorded["label"]
    for key, value in quoted.items():
        if isinstance(value, float):
            assert value == round(recorded[key], 3), key


def test_demo_config_quotes_the_recorded_range_and_one_machine_in_full():
    config = ROOT / "skinml" / "core" / "configs" / "demo.yaml"
    header = "".join(line for line in config.read_text().splitlines(True)
                     if line.startswith("#"))
    text = " ".join(header.replace("#", " ").split())
    epochs, val, test = (span(k) for k in ("best_epoch", "best_val_balanced_accuracy",
                                           "test_balanced_accuracy"))
    assert f"best epoch {int(epochs[0])}-{int(epochs[1])}" in text
    assert f"validation balanced accuracy {val[0]:.2f}-{val[1]:.2f}" in text
    assert f"balanced accuracy {test[0]:.2f}-{test[1]:.2f}" in text
    (amd,) = [run["metrics"] for run in runs if run["cpu"] == QUOTED]
    assert (f"AMD EPYC with AVX-512: {amd['test_balanced_accuracy']:.2f}, 95 % CI "
            f"{amd['test_balanced_accuracy_ci_low']:.2f}-"
            f"{amd['test_balanced_accuracy_ci_high']:.2f}, macro AUC {amd['test_auc']:.2f} "
            f"({amd['test_auc_ci_low']:.2f}-{amd['test_auc_ci_high']:.2f})") in text


def test_every_recorded_run_is_inside_the_range_the_check_allows():
    for run in runs:
        assert script.outside_range(run["metrics"], runs) == [], run["cpu"]


@pytest.mark.parametrize("change, problem", [
    ({"best_epoch": 12.0}, "best epoch 12 < 20"),
    ({"test_balanced_accuracy": 0.2}, "test_balanced_accuracy 0.200 outside"),
    ({"best_val_balanced_accuracy": 0.9}, "best_val_balanced_accuracy 0.900 outside"),
])
def test_the_check_names_what_left_the_range(change, problem):
    (problem_found,) = script.outside_range({**runs[0]["metrics"], **change}, runs)
    assert problem_found.startswith(problem)
