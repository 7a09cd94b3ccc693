"""Config: YAML + overrides into a validated frozen tree; errors name the key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main
from skinml.core.config import Config, ConfigError, load_config, parse_override

from ..conftest import REPO, skinml_in_process

EXPERIMENTS = REPO / "experiments"


@pytest.mark.parametrize("name", ["demo.yaml", "ham10000.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(EXPERIMENTS / name)
    assert isinstance(config, Config)


def test_full_config_is_the_serious_gpu_recipe():
    config = load_config(EXPERIMENTS / "ham10000.yaml")
    assert config.model.arch == "resnext50_32x4d" and config.model.pretrained
    assert config.model.image_size == 224 and config.runtime.amp == "auto"
    assert config.optim.epochs >= 20


def test_overrides_are_typed_from_yaml():
    config = load_config(EXPERIMENTS / "demo.yaml", ["balance.strategy=focal", "optim.lr=3e-4",
                                                     "optim.epochs=2", "model.pretrained=false",
                                                     "data.dir=/data/HAM10000"])
    assert config.balance.strategy == "focal"
    assert config.optim.lr == pytest.approx(3e-4) and config.optim.epochs == 2
    assert config.data.dir == "/data/HAM10000"
    assert config.flat()["optim.lr"] == pytest.approx(3e-4)


def test_a_bare_off_is_the_word_off_where_off_is_a_choice(tmp_path):
    # YAML 1.1 reads `off` as false; runtime.amp's choices include the word itself.
    assert load_config(None, ["runtime.amp=off"]).runtime.amp == "off"
    (tmp_path / "c.yaml").write_text("runtime:\n  amp: off\n")
    assert load_config(tmp_path / "c.yaml").runtime.amp == "off"
    with pytest.raises(ConfigError, match="balance.strategy must be str, got False"):
        load_config(None, ["balance.strategy=off"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key optim.lrr"),
    ("optimizer.lr=0.1", "unknown config section 'optimizer'"),
    ("optim.epochs=0", "optim.epochs must be at least 1"),
    ("optim.epochs=two", "optim.epochs must be int"),
    ("optim.epochs=1.5", "optim.epochs must be int"),
    ("augment.hue=0.9", "augment.hue must be between 0.0 and 0.5"),
    ("augment.scale_min=0.9", "augment.scale_min (0.9) must not exceed"),
    ("runtime.device=gpu", "runtime.device must be auto, cpu"),
    ("lr=0.1", "must look like section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    overrides = [override]
    if "scale_min" in override:
        overrides.append("augment.scale_max=0.5")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(EXPERIMENTS / "demo.yaml", overrides)


def test_bad_yaml_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key lr appears twice \(lines 2 and 3\)"):
        load_config(twice)


def test_parse_override_keeps_strings():
    assert parse_override("runtime.run_name=my run") == ("runtime.run_name", "my run")


def test_train_cli_exits_2_naming_the_bad_key_and_where_it_came_from(tmp_path):
    # The value came from --set, a shortcut or the file: the error names that source.
    cases = [(["--set", "balance.gamma=-1"],
              "error: override balance.gamma=-1: balance.gamma must be between 0.0 and 10.0, "
              "got -1.0"),
             (["--epochs", "0"], "error: --epochs: optim.epochs must be at least 1, got 0"),
             (["--overrides", "optim.epoch=3"], "error: override optim.epoch=3: unknown config "
              "key optim.epoch (valid: ")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("balance:\n  gamma: -1\n")
    cases.append((["--config", str(bad)],
                  f"error: {bad}: balance.gamma must be between 0.0 and 10.0, got -1.0"))
    for args, message in cases:  # in-process: each stops at the config, before any work
        result = CliRunner().invoke(main, ["train", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("demo") == load_config(EXPERIMENTS / "demo.yaml")
    assert load_config("ham10000").model.arch == "resnext50_32x4d"
    with pytest.raises(ConfigError, match="config file nope does not exist"):
        load_config("nope")


def test_a_cache_smaller_than_the_eval_resize_is_an_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"data.cache_size \(64\) is below model.image_size / "
                                          r"model.crop_pct \(96 / 0.875 = 110 px\)"):
        load_config(EXPERIMENTS / "demo.yaml", ["data.cache_size=64"])
    assert load_config(EXPERIMENTS / "demo.yaml", ["data.cache_size=110"]).data.cache_size == 110


def test_train_cli_exits_2_when_the_cache_would_be_upsampled():
    result = skinml_in_process("train", "--config", str(EXPERIMENTS / "demo.yaml"),
                               "--set", "model.image_size=224")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.cache_size (128)" in last
    assert "model.image_size / model.crop_pct (224 / 0.875 = 256 px)" in last
    assert "Traceback" not in result.stderr


def test_metadata_fusion_is_off_by_default_and_its_choices_are_checked():
    assert load_config(EXPERIMENTS / "demo.yaml").model.metadata == "none"
    assert load_config(None, ["model.metadata=film"]).model.metadata == "film"
    with pytest.raises(ConfigError, match=r"model.metadata must be one of none, concat, film, "
                                          r"got 'late'"):
        load_config(None, ["model.metadata=late"])
    with pytest.raises(ConfigError, match=r"model.metadata_dropout must be between 0.0 and 0.9"):
        load_config(None, ["model.metadata_dropout=1.5"])
