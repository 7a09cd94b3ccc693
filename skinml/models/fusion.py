"""Image + metadata fusion: age, sex and body site as a second input beside the image, as
the ISIC 2019/2020 winners fed them (Gessert et al. 2020).

A small encoder turns the clinical vector (`core.clinical`) into an embedding that meets
the backbone's pooled features before the head: joined to them (`concat`), or scaling and
shifting them (`film`, Perez et al. 2018). Missing values are values: a row with nothing
recorded is the all-missing vector, and so is a call without metadata at all. In training
each field is hidden at random (`dropout`) so the model keeps working without them.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from skinml.core.clinical import FIELDS, WIDTH, missing_vector

EMBEDDING = 32


class ClinicalEncoder(nn.Module):
    """(B, WIDTH) clinical vectors -> (B, EMBEDDING); in training each field of each row is
    replaced by its missing value with probability `dropout`."""

    missing: torch.Tensor  # a buffer: the all-missing clinical vector

    def __init__(self, dropout: float = 0.25, width: int = EMBEDDING) -> None:
        super().__init__()
        self.dropout = dropout
        # Batch-normalised, as the image features reaching the head are: an embedding on
        # a much smaller scale than theirs would be learned from last, if at all.
        self.net = nn.Sequential(nn.Linear(WIDTH, width), nn.BatchNorm1d(width),
                                 nn.ReLU(inplace=True), nn.Linear(width, width),
                                 nn.BatchNorm1d(width), nn.ReLU(inplace=True))
        # Not in the state dict: the layout is code (core.clinical), not a learned weight.
        self.register_buffer("missing", torch.from_numpy(missing_vector()), persistent=False)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout:
            clinical = self.hide_fields(clinical)
        return self.net(clinical)

    def hide_fields(self, clinical: torch.Tensor) -> torch.Tensor:
        """Each field of each row set to missing with probability `dropout`."""
        hidden = clinical.clone()
        for where in FIELDS.values():
            mask = torch.rand(len(clinical), 1, device=clinical.device) < self.dropout
            hidden[:, where] = torch.where(mask, self.missing[where], clinical[:, where])
        return hidden


class FusionNet(nn.Module):
    """`backbone`'s pooled features fused with the clinical embedding, then the head `fc`.

    `forward(images)` without metadata is `forward(images, all missing)`.
    """

    def __init__(self, backbone: nn.Module, fusion: str, num_classes: int,
                 drop_rate: float = 0.0, dropout: float = 0.25) -> None:
        super().__init__()
        features = cast(nn.Linear, backbone.fc).in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.fusion = fusion
        self.clinical = ClinicalEncoder(dropout)
        if fusion == "film":
            # Zero at the start: the fused model begins as the image model, and learns how
            # far to let the metadata move its features.
            self.film: nn.Linear | None = nn.Linear(EMBEDDING, 2 * features)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
            head_in = features
        else:
            self.film = None
            head_in = features + EMBEDDING
        head = nn.Linear(head_in, num_classes)
        self.fc = nn.Sequential(nn.Dropout(drop_rate), head) if drop_rate else head

    def forward(self, images: torch.Tensor, clinical: torch.Tensor | None = None
                ) -> torch.Tensor:
        features = self.backbone(images)
        if clinical is None:
            clinical = self.clinical.missing.expand(len(images), -1)
        embedded = self.clinical(clinical.to(self.clinical.missing.dtype))
        if self.film is not None:
            scale, shift = self.film(embedded).chunk(2, dim=1)
            fused = features * (1 + scale) + shift
        else:
            fused = torch.cat([features, embedded.to(features.dtype)], dim=1)
        return self.fc(fused)


def run_network(network: nn.Module, images: torch.Tensor,
                clinical: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for `images`, with their clinical vectors when there are any (batches carry
    them only for a fusion model; an image-only network takes images alone)."""
    return network(images) if clinical is None else network(images, clinical)
