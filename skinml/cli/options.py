"""Options and arguments several commands share, and how blank MLproject values are read.

MLproject passes every parameter of an entry point, blank when the user gave none; these
callbacks turn a blank into "not given", so `mlflow run` and `skinml` take the same options.
"""

from __future__ import annotations

from pathlib import Path

import click

from skinml.core.config import check_key_value, load_config, parse_override


def data_dir_argument(function):
    """The folder as `DATA_DIR` or, as every other command takes it, `--data-dir DIR`."""
    function = click.option("--data-dir", "data_dir_option", metavar="DIR",
                            type=click.Path(path_type=Path),
                            help="HAM10000 folder (the same as DATA_DIR).")(function)
    return click.argument("data_dir", required=False, type=click.Path(path_type=Path))(function)


def one_data_dir(argument: Path | None, option: Path | None) -> Path | None:
    """The folder given as the argument or as --data-dir (both only if the same)."""
    if argument is not None and option is not None and argument != option:
        raise click.BadParameter(f"{option} is not the DATA_DIR argument {argument}: give one",
                                 param_hint="--data-dir")
    return argument or option
ALLOW_MISSING = click.option("--allow-missing", is_flag=True,
                             help="Drop metadata rows whose image file is missing.")


def blank_is_none(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """MLproject passes every parameter; an empty string means "not given"."""
    return value if value not in ("", None) else None


def whole_number(value: str | None, hint: str, minimum: int = 1) -> int | None:
    """An optional whole-number option that MLproject may pass blank (None: not given)."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number", param_hint=hint) from None
    if number < minimum:
        raise click.BadParameter(f"must be at least {minimum}, got {number}", param_hint=hint)
    return number


# Shortcuts for the most overridden config keys; anything else goes through --set.
SHORTCUTS = {"data_dir": "data.dir", "epochs": "optim.epochs", "image_size": "model.image_size",
              "batch_size": "optim.batch_size", "lr": "optim.lr", "arch": "model.arch",
              "balance_strategy": "balance.strategy", "pretrained": "model.pretrained",
              "seed": "runtime.seed"}


# The shortcuts whose value must name a registry entry (training.choices.REGISTRIES): checked
# only when given, as the check imports the registries (torch).
CHOICE_SHORTCUTS = ("arch", "balance_strategy")


def shortcut_overrides(shortcuts: dict[str, str | None]) -> list[str]:
    """`--epochs 5` -> `optim.epochs=5`, each checked here so an error names the option."""
    items = []
    for name, value in shortcuts.items():
        if value is not None:
            item = f"{SHORTCUTS[name]}={value}"
            check_key_value(*parse_override(item), source=_option(name))
            items.append(item)
    return items


def checked_run_overrides(config_path: str, shortcuts: dict[str, str | None],
                          overrides: str | None, sets: tuple[str, ...]) -> list[str]:
    """Every override of a training command, in the order later ones win (the shortcuts,
    MLproject's space-separated --overrides, each --set), once the config they make of
    `config_path` is valid. Types and ranges come first: a mistyped value stops before the
    ~8 s of torch and MLflow imports that a registry name's check needs."""
    items = shortcut_overrides(shortcuts) + (overrides or "").split() + list(sets)
    load_config(config_path, items)
    given = [name for name in CHOICE_SHORTCUTS if shortcuts.get(name) is not None]
    if given:
        from skinml.training.choices import check_choice

        for name in given:
            key = SHORTCUTS[name]
            check_choice(key, parse_override(f"{key}={shortcuts[name]}")[1], _option(name))
    return items


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


GATE_DATA = click.option(
    "--gate-data", callback=blank_is_none, metavar="DIR",
    help="Labelled HAM10000 folder to judge challenger and champion on (all of it). Needed "
         "when their runs were split differently; otherwise their shared test split is used.")
MIN_DELTA = click.option(
    "--min-delta", default=0.0, show_default=True, type=float,
    help="Promote only if the lower end of the 95 % CI of Δ balanced accuracy "
         "(challenger - champion, paired lesion bootstrap) is above this.")


DATA_DIR_OPTION = click.option("--data-dir", callback=blank_is_none, metavar="DIR",
                         help="HAM10000 folder (data.dir).")
SEED = click.option("--seed", callback=blank_is_none, metavar="INT", help="runtime.seed")
OVERRIDES = click.option("--overrides", callback=blank_is_none,
                          help="Space-separated KEY=VALUE overrides (for MLproject).")
