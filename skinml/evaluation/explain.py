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
from skinml.models import run_network


def target_layer(network: nn.Module) -> nn.Module:
    """The last convolutional stage: torchvision ResNeXt `layer4`, SmallResNeXt `layers`
    (of a fusion model's image backbone)."""
    network = getattr(network, "backbone", network)
    for name in ("layer4", "layers"):
        if hasattr(network, name):
            return getattr(network, name)
    raise ValueError(f"no Grad-CAM layer known for {type(network).__name__}")


def grad_cam(network: nn.Module, inputs: torch.Tensor, class_index: int | None = None,
             clinical: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
    """Class activation map (h, w) in [0, 1] for one normalised input (1, 3, S, S) (with
    its clinical vector (1, WIDTH) for a fusion model)."""
    layer = target_layer(network)
    captured: dict[str, torch.Tensor] = {}

    def keep_grad(module: nn.Module, grad_input: tuple[torch.Tensor, ...],
                  grad_output: tuple[torch.Tensor, ...]) -> None:
        captured["grad"] = grad_output[0]

    forward = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("act", o))
    backward = layer.register_full_backward_hook(keep_grad)
    try:
        network.eval()
        inputs = inputs.clone().requires_grad_(True)
        logits = run_network(network, inputs, clinical)
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


FEATURE_MAP = "skinml.gradcam_feature_map"  # key in an overlay's `info`: (h, w) of the CAM
CAM_COLORMAP = "jet"  # the overlays' colours, for the colour bar beside them


def cam_on_image(cam: np.ndarray, image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The CAM of the centre crop, smoothly interpolated onto the original image's pixels.

    Bicubic interpolation between the feature cells' centres, not blocks, with the edge
    cells extended to the crop's border (a map is not pulled towards zero at its edges, which
    would make every CAM look centred); past the crop the map fades to zero within half a
    cell (the network never saw those pixels), so there is no hard edge.
    """
    if preprocess.frame is None:
        raise ValueError("Grad-CAM maps onto the image through preprocess.frame; it has none")
    height, width = preprocess.frame
    cover = max(height / image.height, width / image.width)  # decode.fit_to_frame
    shrink = preprocess.resize / min(height, width)  # preprocess.resize_shorter
    rows = _cell_positions(image.height, max(height, round(image.height * cover)), height,
                           max(preprocess.resize, round(height * shrink)),
                           preprocess.image_size, cam.shape[0])
    columns = _cell_positions(image.width, max(width, round(image.width * cover)), width,
                              max(preprocess.resize, round(width * shrink)),
                              preprocess.image_size, cam.shape[1])
    smooth = (_cubic_weights(rows, cam.shape[0]) @ cam.astype(np.float32)
              @ _cubic_weights(columns, cam.shape[1]).T)
    fade = np.outer(_fade(rows, cam.shape[0]), _fade(columns, cam.shape[1]))
    return np.clip(smooth * fade, 0, 1).astype(np.float32)  # cubic weights overshoot a little


def _cell_positions(original: int, covered: int, framed: int, resized: int, crop: int,
                    cells: int) -> np.ndarray:
    """Where each original pixel's centre falls on one axis of the feature map, in cells
    from the first cell's centre: original -> frame (cover, centre-crop) -> resize -> crop."""
    centres = np.arange(original, dtype=np.float64) + 0.5
    in_frame = centres * covered / original - (covered - framed) // 2
    in_crop = in_frame * resized / framed - (resized - crop) // 2
    return in_crop * cells / crop - 0.5


def _cubic_weights(positions: np.ndarray, cells: int) -> np.ndarray:
    """(positions, cells) interpolation weights of Keys' cubic convolution (a = -0.5), the
    map's edge cells repeated beyond it (positions past the edge take the edge's value)."""
    clamped = np.clip(positions, 0, cells - 1)
    weights = np.zeros((len(positions), cells), dtype=np.float32)
    for offset in range(-2, cells + 2):
        d = np.abs(clamped - offset)
        w = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1,
                     np.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0))
        weights[:, min(max(offset, 0), cells - 1)] += w.astype(np.float32)
    return weights


def _fade(positions: np.ndarray, cells: int) -> np.ndarray:
    """1 inside the crop, falling to 0 within half a cell outside it."""
    outside = np.maximum(-0.5 - positions, positions - (cells - 0.5)).clip(min=0)
    return np.clip(1 - 2 * outside, 0, 1).astype(np.float32)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image under a 'jet' heat map of the CAM, blended alike everywhere (so the colour
    alone reads as the CAM value, as on a colour bar); same size as `image`."""
    heat = colormaps[CAM_COLORMAP](np.clip(cam, 0, 1))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = base * (1 - alpha) + heat * alpha
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))


def explain(model, image: Image.Image, clinical: np.ndarray | None = None
            ) -> tuple[Image.Image, int, float]:
    """(overlay, predicted class index, its probability) for a loaded SkinLesionModel;
    `clinical` is the image's (1, WIDTH) vector for a fusion model (None: not recorded).

    The overlay's `info[FEATURE_MAP]` is the (h, w) of the feature map the CAM came from:
    a 3x3 map can only say which part of the image, not which detail.
    """
    rgb = image.convert("RGB")
    height, width = model.preprocess.frame  # as served: same frame, same crop
    inputs = model.inputs(np.array(fit_to_frame(rgb, height, width))[None])
    vector = None if clinical is None else torch.from_numpy(clinical).to(inputs.device)
    with torch.enable_grad():
        cam, index = grad_cam(model.network, inputs, clinical=vector)
    with torch.no_grad():
        probability = float(model.probabilities(inputs, clinical=vector)[0, index])
    picture = overlay(rgb, cam_on_image(cam, rgb, model.preprocess))
    picture.info[FEATURE_MAP] = cam.shape
    return picture, index, probability
