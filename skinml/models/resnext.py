"""ResNeXt classifiers for the 7 HAM10000 classes, built by name from a plain registry."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import cast
from urllib.error import URLError

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck

from skinml.core.config import ModelConfig
from skinml.core.errors import SkinmlError
from skinml.core.labels import NUM_CLASSES
from skinml.models.fusion import FusionNet


class ModelError(SkinmlError):
    """A model cannot be built (unknown architecture, weights not available)."""


class SmallResNeXt(nn.Module):
    """ResNeXt with torchvision's grouped Bottleneck blocks, narrower and shallower.

    For CPU demos and tests: about 1/25 of ResNeXt-50's multiply-adds at the same input size.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (32, 64, 128, 256),
                 depths: tuple[int, ...] = (1, 1, 2, 1), groups: int = 8, width_per_group: int = 8,
                 stem_width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        stages, inplanes = [], stem_width
        for i, (planes, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                outplanes = planes * Bottleneck.expansion
                downsample = None
                if stride != 1 or inplanes != outplanes:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(outplanes))
                stages.append(Bottleneck(inplanes, planes, stride, downsample, groups=groups,
                                         base_width=width_per_group))
                inplanes = outplanes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in self.layers:  # start each residual branch at zero, as torchvision offers
            nn.init.zeros_(cast(nn.BatchNorm2d, block.bn3).weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


_TORCHVISION = {
    "resnext50_32x4d": (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V2),
    "resnext101_32x8d": (models.resnext101_32x8d, models.ResNeXt101_32X8D_Weights.IMAGENET1K_V2),
    "resnext101_64x4d": (models.resnext101_64x4d, models.ResNeXt101_64X4D_Weights.IMAGENET1K_V1),
}


def _torchvision_builder(name: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        constructor, weights = _TORCHVISION[name]
        model = constructor()
        if pretrained:
            model.load_state_dict(_imagenet_state_dict(name, weights))
        return model
    return build


def _small_builder(pretrained: bool) -> nn.Module:
    if pretrained:
        raise ModelError("model.arch=resnext_small has no ImageNet weights; "
                         "set model.pretrained=false or pick a torchvision ResNeXt")
    return SmallResNeXt()


ARCHITECTURES: dict[str, Callable[[bool], nn.Module]] = {
    **{name: _torchvision_builder(name) for name in _TORCHVISION},
    "resnext_small": _small_builder,
}


def build_model(config: ModelConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The architecture named by `config.arch` with a fresh `num_classes` head; with
    `config.metadata` its features fused with age, sex and body site first."""
    if config.arch not in ARCHITECTURES:
        raise ModelError(f"unknown model.arch {config.arch!r} "
                         f"(valid: {', '.join(sorted(ARCHITECTURES))})")
    model = ARCHITECTURES[config.arch](config.pretrained)
    if config.metadata != "none":
        return FusionNet(model, config.metadata, num_classes, drop_rate=config.drop_rate,
                         dropout=config.metadata_dropout)
    head = nn.Linear(cast(nn.Linear, model.fc).in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(config.drop_rate), head) if config.drop_rate else head
    return model


def require_weights(config: ModelConfig) -> None:
    """Fetch (or find) the ImageNet weights a config asks for, before any work: offline, the
    one-line error comes before a run is made or a cache built, not after."""
    if not config.pretrained:
        return
    if config.arch not in _TORCHVISION:
        build_model(config)  # says what is wrong with this architecture's weights
        return
    weights = _TORCHVISION[config.arch][1]
    if not (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)).is_file():
        _imagenet_state_dict(config.arch, weights)  # downloads into the hub's cache


def _imagenet_state_dict(name: str, weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise ModelError(
            f"cannot fetch ImageNet weights for {name} from {weights.url} ({exc}); to run "
            f"offline set model.pretrained=false, or put {filename} in {checkpoints} "
            "($TORCH_HOME/hub/checkpoints)") from None
