"""The declarative Optuna search space: dotted config keys -> distributions, validated on load.

Kept free of Optuna (`trials.suggest` turns it into suggestions), so a bad entry is
reported before any study or run starts: every bound and choice is checked as the config
would check that key, registry names (architectures, balancing strategies) included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skinml.core.config import ConfigError, check_key_value, shipped_or_path
from skinml.core.errors import SkinmlError
from skinml.core.files import DuplicateKeyError, read_yaml
from skinml.training.choices import check_choice

KINDS = ("float", "int", "categorical")


class SearchSpaceError(SkinmlError):
    """A search-space file or entry is invalid."""


@dataclass(frozen=True)
class Dimension:
    """One searched config key; a categorical may carry parameters per choice."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    conditional: dict[Any, tuple[Dimension, ...]] = field(default_factory=dict)

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or int dimension (an int's are whole numbers)."""
        if self.low is None or self.high is None:
            raise SearchSpaceError(f"entry {self.key}: a {self.kind} needs low and high")
        return self.low, self.high


def load_search_space(path: str | Path) -> tuple[Dimension, ...]:
    path = shipped_or_path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space {path} does not exist")
    try:
        tree = read_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise SearchSpaceError(f"{path}: {exc}") from None
    except yaml.YAMLError:
        raise SearchSpaceError(f"{path}: not valid YAML") from None
    if not isinstance(tree, dict) or not tree:
        raise SearchSpaceError(f"{path}: must map config keys (e.g. augment.rotation) to "
                               "distributions")
    space = tuple(_dimension(str(key), spec, path) for key, spec in tree.items())
    _check_conditional_names(space, path)
    return space


def _dimension(key: str, spec: Any, path: Path) -> Dimension:
    where = f"{path}: entry {key}"
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise SearchSpaceError(f"{where}: needs type: {' | '.join(KINDS)}")
    unknown = set(spec) - {"type", "low", "high", "log", "choices"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        if spec["type"] == "categorical":
            return _categorical(key, spec, path)
        return _numeric(key, spec, where)
    except ConfigError as exc:  # already names the file and entry
        raise SearchSpaceError(str(exc)) from None


def _numeric(key: str, spec: dict[str, Any], where: str) -> Dimension:
    if "low" not in spec or "high" not in spec:
        raise SearchSpaceError(f"{where}: {spec['type']} needs low and high")
    if spec["type"] == "int" and not all(isinstance(spec[b], int) for b in ("low", "high")):
        raise SearchSpaceError(f"{where}: int bounds must be whole numbers")
    low, high = (check_key_value(key, spec[b], source=where) for b in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{where}: log must be true or false")
    if not low < high:
        raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: log scale needs low > 0, got {low}")
    return Dimension(key, spec["type"], float(low) if spec["type"] == "float" else low,
                     float(high) if spec["type"] == "float" else high, log)


def _categorical(key: str, spec: dict[str, Any], path: Path) -> Dimension:
    where = f"{path}: entry {key}"
    choices = spec.get("choices")
    if isinstance(choices, dict):  # choice -> its own parameters
        conditional = {}
        for choice, children in choices.items():
            _check_choice(key, choice, where)
            children = children or {}
            if not isinstance(children, dict):
                raise SearchSpaceError(f"{where}: parameters of choice {choice!r} must be a "
                                       "mapping")
            conditional[choice] = tuple(_dimension(str(k), v, path) for k, v in children.items())
        return Dimension(key, "categorical", choices=tuple(choices), conditional=conditional)
    if not isinstance(choices, list) or len(choices) < 1:
        raise SearchSpaceError(f"{where}: categorical needs a non-empty list of choices")
    for choice in choices:
        _check_choice(key, choice, where)
    return Dimension(key, "categorical", choices=tuple(choices))


def _check_choice(key: str, choice: Any, where: str) -> None:
    check_key_value(key, choice, source=where)
    check_choice(key, choice, source=where)


def _check_conditional_names(space: tuple[Dimension, ...], path: Path) -> None:
    """One name, one distribution: Optuna refuses a parameter that changes its range."""
    seen: dict[str, Dimension] = {}
    for dimension in _flatten(space):
        earlier = seen.setdefault(dimension.key, dimension)
        if (earlier.kind, earlier.low, earlier.high, earlier.log, earlier.choices) != (
                dimension.kind, dimension.low, dimension.high, dimension.log, dimension.choices):
            raise SearchSpaceError(f"{path}: entry {dimension.key} appears twice with different "
                                   "distributions")


def _flatten(space: tuple[Dimension, ...]) -> list[Dimension]:
    flat = []
    for dimension in space:
        flat.append(dimension)
        for children in dimension.conditional.values():
            flat += _flatten(children)
    return flat
