"""Grad-CAM on the served model's own preprocessing, mapped back onto the original image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skinml.core.labels import CLASSES
from skinml.data.preprocess import Preprocess
from skinml.evaluation.explain import FEATURE_MAP, cam_on_image, explain

from ..conftest import SAMPLE_IMAGES


def test_cam_is_upsampled_smoothly_with_no_hard_edge_at_the_crop():
    preprocess = Preprocess(96, 0.875, (120, 160))
    image = Image.new("RGB", (200, 150))
    blocks = cam_on_image(np.eye(3, dtype=np.float32), image, preprocess)
    assert blocks.shape == (150, 200)
    assert len(np.unique(blocks)) > 1000  # nearest-neighbour blocks would have 3 values
    flat = cam_on_image(np.ones((3, 3), dtype=np.float32), image, preprocess)
    steps = max(np.abs(np.diff(flat, axis=0)).max(), np.abs(np.diff(flat, axis=1)).max())
    assert steps < 0.1  # fades out past the crop instead of stopping at a square's edge
    assert flat.max() == pytest.approx(1, abs=0.02) and flat.min() == 0
    # A uniform CAM stays uniform over the whole crop: the map's edges are not pulled towards
    # zero, which would make every CAM (a 1x1 map above all) look like a centred blob.
    single = cam_on_image(np.ones((1, 1), dtype=np.float32), image, preprocess)
    assert (single[50:100, 70:130] == 1).all() and (single[75] >= 0.99).sum() > 100


def test_explain_overlay_keeps_the_image_size_and_names_its_feature_map(gradcam_model):
    with Image.open(SAMPLE_IMAGES[0]) as image:
        picture, index, probability = explain(gradcam_model, image)
        assert picture.size == image.size
    assert picture.info[FEATURE_MAP] == (3, 3)
    assert 0 <= index < len(CLASSES) and 0 < probability <= 1
