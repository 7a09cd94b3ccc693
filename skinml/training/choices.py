"""Config values that name a registry entry, checked by the registries that hold them.

`core.config` knows every key's type and range but not which architectures or balancing
strategies exist: those are the keys of `skinml.models.ARCHITECTURES` and
`skinml.training.balance.STRATEGIES`. A run's config is loaded here, so a name that is not
in its registry stops the run before any work, in the same one line as any other bad value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from skinml.core.config import Config, ConfigError, build_config, load_config, parse_override
from skinml.models import ARCHITECTURES
from skinml.training.balance import STRATEGIES

# The order the error lists them in: architectures sorted, strategies as the registry has them.
REGISTRIES: dict[str, Callable[[], tuple[str, ...]]] = {
    "model.arch": lambda: tuple(sorted(ARCHITECTURES)),
    "balance.strategy": lambda: tuple(STRATEGIES),
}


def check_choice(key: str, value: Any, source: str = "config") -> None:
    """ConfigError unless `value` is an entry of the registry behind `key` (other keys pass)."""
    if key not in REGISTRIES:
        return
    names = REGISTRIES[key]()
    if value not in names:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(names)}, got {value!r}")


def check_choices(config: Config, source: str = "config") -> Config:
    """`config`, once every registry name in it is known."""
    flat = config.flat()
    for key in REGISTRIES:
        check_choice(key, flat[key], source)
    return config


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """`core.config.load_config` plus the registry names; an error blames the override or the
    file the bad name came from."""
    overrides = list(overrides)
    config = load_config(path, overrides)  # types and ranges first, each blamed on its source
    last = {}  # key -> (value, item): the override of a key that counts is its last
    for item in overrides:
        key, value = parse_override(item)
        last[key] = (value, item)
    for key, (value, item) in last.items():
        check_choice(key, value, source=f"override {item}")
    return check_choices(config, str(path) if path is not None else "config")


def build_run_config(tree: dict[str, Any], source: str) -> Config:
    """`core.config.build_config` of a logged config (a checkpoint's, a run's config.yaml)."""
    return check_choices(build_config(tree, source), source)
