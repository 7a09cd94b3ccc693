"""Grad-CAM (Selvaraju et al. 2017): where in the image the network looked for its answer.

Computed on the served model's own preprocessing (frame -> resize -> centre crop) and mapped
back onto the original image, so an overlay has exactly the input image's size.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from skinml.data.decode import fit_to_frame
from skinml.data.preprocess import Preprocess


def target_layer(network: nn.Module) -> nn.Module:
    """The last convolutional stage: torchvision ResNeXt `layer4`, SmallResNeXt `layers`."""
    for name in ("layer4", "layers"):
        if hasattr(network, name):
            return getattr(network, name)
    raise ValueError(f"no Grad-CAM layer known for {type(network).__name__}")


def grad_cam(network: nn.Module, inputs: torch.Tensor, class_index: int | None = None
             ) -> tuple[np.ndarray, int]:
    """Class activation map (h, w) in [0, 1] for one normalised input (1, 3, S, S)."""
    layer = target_layer(network)
    captured: dict[str, torch.Tensor] = {}
    forward = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("act", o))
    backward = layer.register_full_backward_hook(
        lambda m, gi, go: captured.__setitem__("grad", go[0]))
    try:
        network.eval()
        inputs = inputs.clone().requires_grad_(True)
        logits = network(inputs)
        index = int(logits.argmax(1)) if class_index is None else class_index
        network.zero_grad()
        logits[0, index].backward()
    finally:
        forward.remove()
        backward.remove()
    weights = captured["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * captured["act"]).sum(1))[0].detach()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.cpu().numpy(), index


def cam_on_image(cam: np.ndarray, image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Map a CAM of the centre crop back to the original image's pixels (zeros elsewhere)."""
    height, width = preprocess.frame
    scale = preprocess.resize / min(height, width)  # framed image -> resized image
    crop = preprocess.image_size / scale  # side of the crop, in framed-image pixels
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = int(round((height - crop) / 2)), int(round((width - crop) / 2))
    side = max(1, int(round(crop)))
    patch = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((side, side),
                                                                      Image.Resampling.BILINEAR))
    canvas[top:top + side, left:left + side] = patch[:height - top, :width - left]
    # framed image -> original: the frame is the original scaled to cover it, centre-cropped
    cover = max(height / image.height, width / image.width)
    region_w, region_h = width / cover, height / cover
    original = np.zeros((image.height, image.width), dtype=np.float32)
    x0, y0 = int(round((image.width - region_w) / 2)), int(round((image.height - region_h) / 2))
    w, h = max(1, int(round(region_w))), max(1, int(round(region_h)))
    mapped = np.asarray(Image.fromarray(canvas).resize((w, h), Image.Resampling.BILINEAR))
    original[y0:y0 + h, x0:x0 + w] = mapped[:image.height - y0, :image.width - x0]
    return original


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with the CAM as a 'jet' heat map on top; same size as `image`."""
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    weight = alpha * np.clip(cam, 0, 1)[..., None]
    return Image.fromarray(((base * (1 - weight) + heat * weight) * 255).astype(np.uint8))


def explain(model, image: Image.Image) -> tuple[Image.Image, int, float]:
    """(overlay, predicted class index, its probability) for a loaded SkinLesionModel."""
    rgb = image.convert("RGB")
    height, width = model.preprocess.frame  # as served: same frame, same crop
    inputs = model.inputs(np.array(fit_to_frame(rgb, height, width))[None])
    with torch.enable_grad():
        cam, index = grad_cam(model.network, inputs)
    with torch.no_grad():
        probability = float(model.probabilities(inputs)[0, index])
    return overlay(rgb, cam_on_image(cam, rgb, model.preprocess)), index, probability
