"""The preprocessing contract between training, evaluation, serving and Grad-CAM.

Images are fitted to the cache frame (decode.fit_to_frame), resized so the shorter side is
`image_size / crop_pct`, centre-cropped to `image_size` and normalised with ImageNet's
mean and std. `Preprocess` carries these numbers with the model (as timm's pretrained
config does), so nothing downstream reconstructs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What turns a decoded image into network input, stored with every model."""

    image_size: int
    crop_pct: float
    frame: tuple[int, int] | None = None  # (height, width) images are fitted to first

    @property
    def resize(self) -> int:
        """Shorter side before the centre crop (training samples its crops at this scale)."""
        return round(self.image_size / self.crop_pct)

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self.image_size, self.crop_pct)

    def to_meta(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "crop_pct": self.crop_pct,
                "frame": list(self.frame) if self.frame else None}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocess:
        frame = meta.get("frame")
        return cls(int(meta["image_size"]), float(meta["crop_pct"]),
                   (int(frame[0]), int(frame[1])) if frame else None)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (B, 3, H, W) so the shorter side is `size`."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode="bilinear", antialias=True,
                         align_corners=False)


class Normalize(nn.Module):
    mean: torch.Tensor  # buffers, (1, 3, 1, 1)
    std: torch.Tensor

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class EvalTransform(nn.Module):
    """uint8 (B, H, W, 3) -> normalised (B, 3, S, S): resize to S/crop_pct, centre-crop S."""

    def __init__(self, image_size: int, crop_pct: float) -> None:
        super().__init__()
        self.image_size = image_size
        self.resize = round(image_size / crop_pct)
        self.normalize = Normalize()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shorter(to_float(images), self.resize)
        height, width = x.shape[-2:]
        top, left = (height - self.image_size) // 2, (width - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size]
        return self.normalize(x)
