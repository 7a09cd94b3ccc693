"""Registry names in a config: checked by the registries that hold them, each error one line
naming the key and where the value came from."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skinml.cli import main
from skinml.cli.options import CHOICE_SHORTCUTS, SHORTCUTS
from skinml.core.config import ConfigError, load_config
from skinml.models import ARCHITECTURES
from skinml.training.balance import STRATEGIES
from skinml.training.choices import (
    REGISTRIES,
    build_run_config,
    check_choice,
    load_run_config,
)

from ..conftest import DEMO


@pytest.mark.parametrize("override, message", [
    ("balance.strategy=magic", "override balance.strategy=magic: balance.strategy must be one "
                               "of none, oversample, sampler, weighted_loss, focal, "
                               "logit_adjust, got 'magic'"),
    ("model.arch=resnet18", "override model.arch=resnet18: model.arch must be one of "
                            "resnext101_32x8d, resnext101_64x4d, resnext50_32x4d, "
                            "resnext_small, got 'resnet18'"),
])
def test_an_unknown_registry_name_names_the_key_its_source_and_the_choices(override, message):
    with pytest.raises(ConfigError) as refused:
        load_run_config(DEMO, [override])
    assert str(refused.value) == message


def test_the_last_override_of_a_key_is_the_one_checked():
    config = load_run_config(DEMO, ["model.arch=resnet18", "model.arch=resnext_small"])
    assert config.model.arch == "resnext_small"


def test_a_bad_name_in_a_file_or_a_logged_config_blames_that_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: vgg16\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: model.arch must be one of .*got 'vgg16'"):
        load_run_config(bad)
    tree = load_config(DEMO).to_dict()
    tree["balance"]["strategy"] = "magic"
    with pytest.raises(ConfigError, match=r"^run x config.yaml: balance.strategy must be one"):
        build_run_config(tree, "run x config.yaml")


def test_the_choices_are_the_registries_keys():
    for arch in ARCHITECTURES:
        check_choice("model.arch", arch)
    for strategy in STRATEGIES:
        check_choice("balance.strategy", strategy)
    check_choice("optim.lr", "anything")  # not a registry key: nothing to check


def test_the_core_config_alone_takes_any_name_the_registries_then_refuse():
    # core.config imports no registry: a name is only a string there
    assert load_config(DEMO, ["model.arch=vgg16"]).model.arch == "vgg16"


def test_train_cli_names_the_option_a_bad_name_came_from():
    for args, message in ((["--arch", "vgg16"], "error: --arch: model.arch must be one of "),
                          (["--balance-strategy", "magic"],
                           "error: --balance-strategy: balance.strategy must be one of "),
                          (["--set", "model.arch=vgg16"],
                           "error: override model.arch=vgg16: model.arch must be one of ")):
        result = CliRunner().invoke(main, ["train", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_cli_checks_a_registry_name_for_each_shortcut_that_takes_one():
    # the shortcuts checked after the imports (cli.options) are those naming a registry key
    assert {SHORTCUTS[name] for name in CHOICE_SHORTCUTS} == set(REGISTRIES)
