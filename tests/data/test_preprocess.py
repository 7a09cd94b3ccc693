"""The preprocessing contract: resize, centre crop, normalise; carried with every model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skinml.data.preprocess import EvalTransform, Preprocess, resize_shorter, to_float

torch.manual_seed(0)
IMAGES = torch.randint(0, 256, (6, 48, 64, 3), dtype=torch.uint8)


def test_eval_transform_is_resize_then_centre_crop():
    out = EvalTransform(32, 0.8)(IMAGES)
    x = F.interpolate(to_float(IMAGES), size=(40, 53), mode="bilinear", antialias=True,
                      align_corners=False)
    left = (53 - 32) // 2
    expected = x[..., 4:36, left:left + 32]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(out, (expected - mean) / std, atol=1e-5)


def test_resize_shorter_keeps_aspect():
    assert resize_shorter(to_float(IMAGES), 24).shape[-2:] == (24, 32)


def test_preprocess_travels_as_plain_meta_and_back():
    preprocess = Preprocess(96, 0.875, (128, 170))
    meta = preprocess.to_meta()
    assert meta == {"image_size": 96, "crop_pct": 0.875, "frame": [128, 170]}
    assert Preprocess.from_meta(meta) == preprocess
    assert preprocess.resize == 110  # round(96 / 0.875), what training and serving resize to


def test_eval_transform_of_the_contract_is_the_one_built_by_hand():
    preprocess = Preprocess(32, 0.8)
    assert torch.equal(preprocess.eval_transform()(IMAGES), EvalTransform(32, 0.8)(IMAGES))
