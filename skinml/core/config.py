"""One frozen config tree: dataclasses built from a YAML file plus `key=value` overrides.

Every field states its type and allowed values beside its default; `load_config` checks
them all, so a bad value stops a run before it starts and names the key. What runs is
exactly what gets logged: `Config.to_dict()` is the resolved config.

Two keys name an entry of a registry that lives in a higher layer (`model.arch`: the
architectures of `skinml.models`; `balance.strategy`: the strategies of
`skinml.training.balance`). The config checks only that they are strings; the registries
check the names (`skinml.training.choices`), so this module imports no registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skinml.core.errors import SkinmlError
from skinml.core.files import DuplicateKeyError, read_yaml


class ConfigError(SkinmlError):
    """A config file, key or value is invalid."""


def _opt(default: Any, *, low: float | None = None, high: float | None = None,
         choices: tuple[str, ...] | None = None, help: str = "") -> Any:
    """A config field with its rules."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices,
                                            "help": help})


@dataclass(frozen=True)
class DataConfig:
    dir: str | None = _opt(None, help="HAM10000 folder; null = the bundled sample")
    cache_size: int = _opt(256, low=8, help="shorter side of the decode-once cache")
    val_frac: float = _opt(0.15, low=0.01, high=0.5)
    test_frac: float = _opt(0.15, low=0.01, high=0.5)
    split_seed: int = _opt(0, low=0)
    allow_missing: bool = _opt(False)
    skip_corrupt: bool = _opt(False)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _opt("resnext50_32x4d", help="a name in skinml.models.ARCHITECTURES")
    pretrained: bool = _opt(False, help="ImageNet weights from torchvision")
    image_size: int = _opt(224, low=16, high=1024)
    crop_pct: float = _opt(0.875, low=0.5, high=1.0, help="eval: resize to size/crop_pct, crop")
    drop_rate: float = _opt(0.0, low=0.0, high=0.9, help="dropout before the classifier")
    metadata: str = _opt("none", choices=("none", "concat", "film"),
                         help="age, sex and body site beside the image: none, concat "
                              "(joined to the image features) or film (scaling them)")
    metadata_dropout: float = _opt(0.25, low=0.0, high=0.9,
                                   help="training: chance each of age, sex and site is "
                                        "hidden, so the model also works without them")


@dataclass(frozen=True)
class AugmentConfig:
    scale_min: float = _opt(0.35, low=0.05, high=1.0, help="random resized crop: min area")
    scale_max: float = _opt(1.0, low=0.05, high=1.0)
    ratio_min: float = _opt(0.75, low=0.2, high=5.0, help="random resized crop: aspect range")
    ratio_max: float = _opt(1.3333, low=0.2, high=5.0)
    hflip: bool = _opt(True)
    vflip: bool = _opt(True)
    rotation: float = _opt(180.0, low=0.0, high=180.0, help="max degrees either way")
    brightness: float = _opt(0.2, low=0.0, high=1.0)
    contrast: float = _opt(0.2, low=0.0, high=1.0)
    saturation: float = _opt(0.2, low=0.0, high=1.0)
    hue: float = _opt(0.02, low=0.0, high=0.5)
    mixup_alpha: float = _opt(0.0, low=0.0, high=10.0, help="0 = off")
    cutmix_alpha: float = _opt(0.0, low=0.0, high=10.0, help="0 = off")


@dataclass(frozen=True)
class BalanceConfig:
    strategy: str = _opt("sampler", help="a name in skinml.training.balance.STRATEGIES")
    alpha: float = _opt(0.5, low=0.0, high=2.0,
                        help="sampler/weighted_loss/focal: weight = class_count^-alpha")
    gamma: float = _opt(2.0, low=0.0, high=10.0, help="focal loss focusing")
    focal_class_weights: bool = _opt(False, help="focal: also weight classes by alpha")
    tau: float = _opt(1.0, low=0.0, high=5.0, help="logit adjustment strength")
    oversample_ratio: float = _opt(1.0, low=0.01, high=1.0,
                                   help="oversample: each class to ratio x the largest")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = _opt("adamw", choices=("adamw", "sgd"))
    lr: float = _opt(1e-3, low=1e-7, high=10.0)
    weight_decay: float = _opt(0.05, low=0.0, high=1.0)
    momentum: float = _opt(0.9, low=0.0, high=0.999, help="sgd only")
    epochs: int = _opt(30, low=1)
    warmup_epochs: float = _opt(1.0, low=0.0)
    batch_size: int = _opt(64, low=1)
    label_smoothing: float = _opt(0.1, low=0.0, high=0.5)
    grad_clip: float = _opt(1.0, low=0.0, help="max gradient norm; 0 = off")
    ema_decay: float = _opt(0.0, low=0.0, high=0.99999, help="EMA of weights; 0 = off")
    early_stopping_patience: int = _opt(0, low=0, help="epochs without val gain; 0 = off")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = _opt("auto", help="auto, cpu, cuda, cuda:N or mps")
    amp: str = _opt("auto", choices=("auto", "off", "bf16", "fp16"),
                    help="auto: bf16/fp16 on CUDA, off on CPU")
    channels_last: bool = _opt(True)
    compile: bool = _opt(False, help="torch.compile the model")
    seed: int = _opt(0, low=0)
    eval_batch_size: int = _opt(256, low=1)
    workers: int = _opt(0, low=0, help="decoding threads for the cache; 0 = one per core")
    checkpoint_dir: str | None = _opt(None, help="null = $SKINML_CACHE/checkpoints")
    keep_checkpoint: bool = _opt(False, help="keep a finished run's checkpoint (killed and "
                                 "failed runs keep theirs for --resume)")
    experiment: str = _opt("skin-lesion", help="MLflow experiment (unless `mlflow run` chose)")
    run_name: str | None = _opt(None)
    progress: bool = _opt(True, help="tqdm bars")
    bootstrap: int = _opt(1000, low=0, help="resamples for the test metrics' CIs; 0 = off")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"optim.lr": 0.001, ...}: the resolved config as MLflow params."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items()
                for key, value in values.items()}


SHIPPED = Path(__file__).parent / "configs"  # demo, ham10000, search_space (= experiments/)


def shipped_or_path(value: str | Path) -> Path:
    """`value` as a file path, or the name of a YAML shipped with skinml (`demo`,
    `ham10000`, `search_space`), so the defaults work from any folder."""
    path = Path(value)
    shipped = SHIPPED / f"{value}.yaml"
    if not path.is_file() and path.suffix == "" and shipped.is_file():
        return shipped
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                ) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides, validated."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = shipped_or_path(path)
        tree = _read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        check_key_value(key, value, source=f"override {item}")  # blame the override, not the file
        section, _, name = key.partition(".")
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"config section {section} must be a mapping")
        tree[section][name] = value
    source = str(path) if path else "config"
    return build_config(tree, source=f"{source} with overrides" if overrides else source)


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", 0.0003); the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value "
                          "(e.g. balance.strategy=focal)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested mapping against the dataclasses; errors name the dotted key."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown config section {unknown[0]!r} "
                          f"(valid: {', '.join(sections)})")
    built = {}
    hints = typing.get_type_hints(Config)
    for name in sections:
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name} must be a mapping of key: value")
        built[name] = _build_section(hints[name], name, values, source)
    config = Config(**built)
    _check_consistency(config, source)
    return config


def check_key_value(key: str, value: Any, source: str = "config") -> Any:
    """Validate one `section.key` value against its field; returns the typed value."""
    section, _, name = key.partition(".")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown config section {section!r} "
                          f"(valid: {', '.join(sections)})")
    cls = typing.get_type_hints(Config)[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"{source}: unknown config key {key} "
                          f"(valid: {', '.join(sorted(fields))})")
    return _check_value(key, value, typing.get_type_hints(cls)[name], fields[name].metadata,
                        source)


def _build_section(cls: type, section: str, values: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown config key {section}.{unknown[0]} "
                          f"(valid: {', '.join(sorted(fields))})")
    checked = {name: _check_value(f"{section}.{name}", values[name], hints[name],
                                  fields[name].metadata, source)
               for name in values}
    return cls(**checked)


def _check_value(key: str, value: Any, hint: Any, rules: Mapping[str, Any], source: str
                 ) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{source}: {key} must not be empty")
    kind = next(t for t in allowed if t is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML reads 1e-3 (no dot) as a string
            value = float(value)
    choices = rules.get("choices")
    if kind is str and isinstance(value, bool) and choices and "off" in choices:
        value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as false
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, "
                          f"got {value!r}")
    low, high = rules.get("low"), rules.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{source}: {key} must be {bounds}, got {value!r}")
    return value


def _check_consistency(config: Config, source: str) -> None:
    aug = config.augment
    if aug.scale_min > aug.scale_max:
        raise ConfigError(f"{source}: augment.scale_min ({aug.scale_min}) must not exceed "
                          f"augment.scale_max ({aug.scale_max})")
    if aug.ratio_min > aug.ratio_max:
        raise ConfigError(f"{source}: augment.ratio_min ({aug.ratio_min}) must not exceed "
                          f"augment.ratio_max ({aug.ratio_max})")
    # Training and evaluation resize the cached frame's shorter side to this before cropping.
    resize = round(config.model.image_size / config.model.crop_pct)
    if config.data.cache_size < resize:
        raise ConfigError(f"{source}: data.cache_size ({config.data.cache_size}) is below "
                          f"model.image_size / model.crop_pct ({config.model.image_size} / "
                          f"{config.model.crop_pct:g} = {resize} px), so every image would be "
                          f"upsampled: set data.cache_size to at least {resize} or lower "
                          "model.image_size")
    if config.data.val_frac + config.data.test_frac >= 0.9:
        raise ConfigError(f"{source}: data.val_frac + data.test_frac must leave at least 10% "
                          "of the images for training")
    device = config.runtime.device
    if not (device in ("auto", "cpu", "cuda", "mps") or
            (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{source}: runtime.device must be auto, cpu, cuda, cuda:N or mps, "
                          f"got {device!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = read_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (data, model, ...)")
    return tree
