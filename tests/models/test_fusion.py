"""Fusion models: every architecture takes age, sex and body site beside the image; no
metadata is exactly all of it missing; training hides fields at random, evaluation never."""

from __future__ import annotations

import pytest
import torch

from skinml.core.clinical import FIELDS, WIDTH, missing_vector
from skinml.core.config import ModelConfig
from skinml.models import ARCHITECTURES, FusionNet, build_model, run_network


def vectors(batch: int, seed: int = 0) -> torch.Tensor:
    """Random one-hot clinical vectors with a real age: nothing missing."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(batch, WIDTH)
    rows[:, 0] = torch.rand(batch, generator=generator)
    for name in ("sex", "localization"):
        where = FIELDS[name]
        picked = torch.randint(where.start, where.stop - 1, (batch,), generator=generator)
        rows[torch.arange(batch), picked] = 1.0
    return rows


# Every architecture with one fusion, both fusions on two (a ResNeXt-101 takes 2 s to build).
PAIRS = [(arch, "concat") for arch in sorted(ARCHITECTURES)] + [
    ("resnext_small", "film"), ("resnext50_32x4d", "film")]


@pytest.mark.parametrize(("arch", "fusion"), PAIRS)
def test_every_architecture_fuses_and_without_metadata_is_all_missing(arch, fusion):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, image_size=32, metadata=fusion,
                                    drop_rate=0.2)).eval()
    assert isinstance(model, FusionNet)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        alone = model(images)
        missing = torch.from_numpy(missing_vector()).expand(3, -1)
        assert alone.shape == (3, 7)
        torch.testing.assert_close(alone, model(images, missing), rtol=0, atol=0)
        known = model(images, vectors(3))
    if fusion == "film":  # starts as the image model: the metadata moves nothing yet
        torch.testing.assert_close(known, alone)
    else:
        assert not torch.allclose(known, alone)


def test_an_image_only_model_is_unchanged():
    """metadata: none builds the same module (and state-dict keys) as before fusion."""
    model = build_model(ModelConfig(arch="resnext_small", image_size=32))
    assert not isinstance(model, FusionNet)
    fusion_keys = ("backbone.", "clinical.", "film.")
    assert not any(key.startswith(fusion_keys) for key in model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(run_network(model, images), model(images))


def test_training_hides_fields_at_random_and_evaluation_never():
    model = build_model(ModelConfig(arch="resnext_small", image_size=32, metadata="concat",
                                    metadata_dropout=0.5))
    encoder = model.clinical
    known = vectors(4000)
    torch.manual_seed(0)
    hidden = encoder.hide_fields(known)
    missing = torch.from_numpy(missing_vector())
    for where in FIELDS.values():
        dropped = (hidden[:, where] == missing[where]).all(1)
        assert 0.45 < dropped.float().mean() < 0.55  # each field on its own
        assert torch.equal(hidden[~dropped, where], known[~dropped, where])  # others untouched
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, known[:2]), model(images, known[:2]))


def test_the_metadata_encoder_has_no_persistent_layout():
    """The missing vector is code (core.clinical), not a weight in the checkpoint."""
    model = build_model(ModelConfig(arch="resnext_small", image_size=32, metadata="film"))
    assert "clinical.missing" not in model.state_dict()
    assert {"film.weight", "film.bias", "fc.weight"} <= set(model.state_dict())
