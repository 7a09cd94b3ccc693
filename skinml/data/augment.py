"""Batched augmentation on the training device.

Every image of a batch gets its own random resized crop, flips and rotation, all folded
into one affine map and applied by a single `grid_sample`, then its own colour jitter:
no per-image Python work, so a GPU augments a batch in well under a millisecond. Without
randomness it gives exactly the evaluation view (`skinml.data.preprocess`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from skinml.core.config import AugmentConfig
from skinml.core.labels import NUM_CLASSES
from skinml.data.preprocess import Normalize, resize_shorter, to_float


class TrainAugment(nn.Module):
    """uint8 (B, H, W, 3) + labels -> augmented normalised (B, 3, S, S) + (soft) targets."""

    def __init__(self, config: AugmentConfig, image_size: int, crop_pct: float,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.config = config
        self.image_size = image_size
        # Crops are sampled from the image at eval scale, so sampling never aliases badly.
        self.base_size = round(image_size / crop_pct)
        self.normalize = Normalize()
        mixers = []
        if config.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
        if config.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = resize_shorter(to_float(images), self.base_size)
        x = self._geometry(x)
        x = self._colour(x).clamp_(0, 1)
        x = self.normalize(x)
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x, labels

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop + flips + rotation as one per-sample affine resampling."""
        cfg, batch, device = self.config, x.shape[0], x.device
        height, width = x.shape[-2:]
        area = torch.empty(batch, device=device).uniform_(cfg.scale_min, cfg.scale_max)
        log_ratio = torch.empty(batch, device=device).uniform_(
            math.log(cfg.ratio_min), math.log(cfg.ratio_max))
        ratio = log_ratio.exp()
        # Crop size as a fraction of the image side, as torchvision's RandomResizedCrop.
        crop_w = (area * height * width * ratio).sqrt().div(width).clamp(max=1)
        crop_h = (area * height * width / ratio).sqrt().div(height).clamp(max=1)
        centre_x = (torch.rand(batch, device=device) * 2 - 1) * (1 - crop_w)
        centre_y = (torch.rand(batch, device=device) * 2 - 1) * (1 - crop_h)
        angle = torch.empty(batch, device=device).uniform_(-1, 1) * math.radians(cfg.rotation)
        flip_x = _random_sign(batch, cfg.hflip, device)
        flip_y = _random_sign(batch, cfg.vflip, device)
        cos, sin = angle.cos(), angle.sin()
        # Output coords (u, v) in [-1, 1] -> input coords; rotation happens in pixel units,
        # so the aspect ratio of the crop survives rotation.
        half_w, half_h = crop_w * width, crop_h * height
        theta = torch.stack([
            torch.stack([cos * half_w / width * flip_x, -sin * half_h / width * flip_y,
                         centre_x], 1),
            torch.stack([sin * half_w / height * flip_x, cos * half_h / height * flip_y,
                         centre_y], 1),
        ], 1)
        size = [batch, x.shape[1], self.image_size, self.image_size]
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness, contrast, saturation and hue jitter (ColorJitter's ranges)."""
        cfg, batch = self.config, x.shape[0]

        def factor(strength: float) -> torch.Tensor:
            return torch.empty(batch, 1, 1, 1, device=x.device).uniform_(
                max(0.0, 1 - strength), 1 + strength)

        if cfg.brightness:
            x = x * factor(cfg.brightness)
        if cfg.contrast:
            mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor(cfg.contrast) + mean
        if cfg.saturation:
            grey = _luma(x)
            x = (x - grey) * factor(cfg.saturation) + grey
        if cfg.hue:
            x = _rotate_hue(x, torch.empty(batch, device=x.device).uniform_(-cfg.hue, cfg.hue))
        return x


def _random_sign(batch: int, enabled: bool, device: torch.device) -> torch.Tensor:
    if not enabled:
        return torch.ones(batch, device=device)
    return torch.randint(0, 2, (batch,), device=device).float() * 2 - 1


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
# Inverted once here: torch.linalg.inv on a GPU waits for the device to check the result.
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift hue by `turns` of the colour wheel: a rotation of the chroma plane in YIQ."""
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    to_rgb = _YIQ_TO_RGB.to(x.device, x.dtype)
    angle = turns * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([torch.stack([one, zero, zero], 1),
                            torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)
    matrix = to_rgb @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x)
