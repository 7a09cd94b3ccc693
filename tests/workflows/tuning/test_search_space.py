"""The search space: every entry checked as the config would check its key, before any
study starts; a bad one is one line naming the file and entry, exit 2."""

from __future__ import annotations

import mlflow
import pytest

from skinml.tracking.logged_model import reads_clinical
from skinml.tracking.reader import logged_model_uri
from skinml.workflows.tuning.study import tune

from ...conftest import DEMO, skinml_in_process, tiny
from .conftest import runs_of, tuning_options


@pytest.mark.parametrize("entry, message", [
    ("augment.rotaton: {type: float, low: 0, high: 90}",
     "entry augment.rotaton: unknown config key augment.rotaton"),
    ("augment.hue: {type: float, low: 0.3, high: 0.1}", "entry augment.hue: low (0.3) must be"),
    ("augment.hue: {type: float, low: 0.0, high: 0.9}",
     "entry augment.hue: augment.hue must be between 0.0 and 0.5, got 0.9"),
    ("balance.strategy: {type: categorical, choices: [focal, magic]}",
     "entry balance.strategy: balance.strategy must be one of"),
    ("augment.rotation: {type: float, low: 0, high: 90, log: true}",
     "entry augment.rotation: log scale needs low > 0, got 0.0"),
    ("optim.lr: {type: float, low: 0, high: 0.1}",
     "entry optim.lr: optim.lr must be between 1e-07 and 10.0, got 0.0"),
    ("optim.lr: {type: uniform, low: 0.001, high: 0.1}",
     "entry optim.lr: needs type: float | int | categorical"),
    # a key written twice: YAML alone keeps the second, as the shipped space once did
    ("optim.lr: {type: float, low: 0.001, high: 0.1}\noptim.lr: {type: float, low: 0.01, "
     "high: 0.1}", "key optim.lr appears twice (lines 1 and 2)"),
])
def test_bad_search_space_exits_2_naming_the_entry(unmade_tracking, tmp_path, entry, message):
    space = tmp_path / "space.yaml"
    space.write_text(entry + "\n")
    result = skinml_in_process("tune", "--config", str(DEMO), "--search-space", str(space),
                               "--storage", f"sqlite:///{tmp_path / 'o.db'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
    assert result.stderr.startswith(f"error: {space}: {message}")
    assert not (tmp_path / "o.db").exists()  # nothing started
    assert not (tmp_path / "mlflow.db").exists()


def test_the_real_command_stops_on_a_bad_entry_the_same_way(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("augment.hue: {type: float, low: 0.0, high: 0.9}\n")
    result = skinml_in_process("tune", "--config", str(DEMO), "--search-space", str(space),
                               "--storage", f"sqlite:///{tmp_path / 'o.db'}", cwd=tmp_path,
                               env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {space}: entry augment.hue: augment.hue must be between 0.0 and 0.5, got 0.9")
    assert "Traceback" not in result.stderr and not (tmp_path / "o.db").exists()


@pytest.mark.slow
def test_metadata_fusion_is_a_choice_a_trial_trains_with(tracking, tmp_path, synthetic):
    """`model.metadata` with a per-choice `model.metadata_dropout`: the trial's run records
    both, and its model reads age, sex and body site."""
    space = tmp_path / "space.yaml"
    space.write_text("model.metadata:\n  type: categorical\n  choices:\n    film:\n"
                     "      model.metadata_dropout: {type: float, low: 0.1, high: 0.4}\n")
    tune(tuning_options(tmp_path, synthetic, search_space=space, n_trials=1,
                        overrides=tuple(tiny(synthetic, "optim.epochs=1"))))
    _, (trial,) = runs_of("study")
    assert trial.data.params["model.metadata"] == "film"
    assert 0.1 <= float(trial.data.params["model.metadata_dropout"]) <= 0.4
    model = mlflow.pyfunc.load_model(logged_model_uri(trial.info.run_id))
    assert reads_clinical(model)
