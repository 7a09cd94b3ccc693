"""The fresh-clone contract: README's set-up block, CI, and the environment files agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_setup_block_is_install_plus_main_job_then_tests():
    install_and_run, test = readme_setup_commands()
    install, main_job = install_and_run.split(" && ")
    assert install == 'pip install -e ".[dev]"'
    assert main_job.startswith("mlflow run . --env-manager local")
    assert test == "python -m pytest"


def test_ci_runs_readmes_install_and_test_commands():
    """Besides README's commands, CI only starts PostgreSQL and installs Java where missing
    (what the suite's real services need), and checks the main job's numbers after it."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd ", "pg_isready",
                                                    "command -v java "))]
    install_and_run, test = readme_setup_commands()
    assert ci == [install_and_run.split(" && ")[0], test,
                  "python scripts/demo_numbers.py --check"]


def test_mlproject_main_takes_the_documented_parameters():
    main = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]
    assert set(main["parameters"]) == {"config", "data_dir", "epochs", "image_size",
                                       "batch_size", "lr", "arch", "balance_strategy",
                                       "pretrained", "seed", "overrides"}
    assert main["parameters"]["config"]["default"] == "experiments/demo.yaml"
    assert main["command"].startswith("python -m skinml train")


def test_mlproject_register_mirrors_the_cli_options():
    register = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["register"]
    assert set(register["parameters"]) == {"run_id", "experiment", "metric", "name", "gate_data",
                                           "min_delta", "force"}
    assert register["parameters"]["metric"]["default"] == "best_val_balanced_accuracy"
    assert register["command"].startswith("python -m skinml register")


def test_mlproject_tune_takes_the_issue_parameters():
    tune = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["tune"]
    assert {"config", "search_space", "n_trials", "timeout", "study_name", "storage", "sampler",
            "pruner", "register_best", "seed"} <= set(tune["parameters"])
    assert tune["command"].startswith("python -m skinml tune")


def test_every_mlproject_entry_point_passes_options_its_command_takes():
    from skinml.cli import main

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert {"main", "tune", "cv", "pipeline", "register", "evaluate"} <= set(entry_points)
    for name, entry in entry_points.items():
        words = entry["command"].split()
        command = main.commands[words[3]]
        options = {opt for param in command.params for opt in param.opts}
        passed = [w for w in words if w.startswith("--")]
        assert set(passed) <= options, (name, sorted(set(passed) - options))
        for parameter in entry["parameters"]:  # every parameter reaches the command
            assert f"{{{parameter}}}" in entry["command"], (name, parameter)


def test_mlproject_evaluate_mirrors_the_cli():
    evaluate = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["evaluate"]
    assert set(evaluate["parameters"]) == {"model_uri", "data_dir", "split", "truth", "tta",
                                           "bootstrap"}
    assert evaluate["command"].startswith("python -m skinml evaluate")


def test_conda_env_has_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == project["dependencies"]


def test_mlproject_uses_the_conda_env():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["name"] == "skinml" and spec["conda_env"] == "conda.yaml"


def test_bundled_sample_ships_with_its_licence_note():
    sample = ROOT / "skinml" / "sample"
    assert "CC BY-NC-SA 4.0" in (sample / "README.md").read_text()
    assert len(list(sample.glob("*.jpg"))) == 660
