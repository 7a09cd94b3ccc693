"""The batched JPEG path against `decode_to_frame`, the pixels training saw.

Measured on the CPU (torchvision's libjpeg-turbo against Pillow's, so the differences come
from emulating PIL's DCT-scaled `draft` with a box average, and from resize rounding): at
most 2 uint8 levels anywhere, at most 0.19 levels mean over an image (real 200x150 sample
JPEGs, synthetic 600x450 ones, and 1800x1350, 1001x777, 333x517, greyscale, progressive and
4:4:4 JPEGs, at frames 40x53, 128x170, 224x298 and 256x341). On CUDA nvjpeg's IDCT and
chroma upsampling are not libjpeg-turbo's (its default upsampling is not libjpeg's "fancy"
triangle filter), so colour edges differ by a few levels before the resize: that test
allows a mean of 2 levels per image and bounds no single pixel.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinml.data.decode import decode_to_frame
from skinml.data.errors import CorruptImageError
from skinml.data.jpeg_batch import CorruptRowError, decode_batch

from ..conftest import SAMPLE_IMAGES, cuda_test

FRAMES = [(40, 53), (128, 170), (224, 298), (256, 341)]
CPU_MAX, CPU_MEAN = 2, 0.25
CUDA_MEAN = 2.0


def _encode(image: Image.Image, kind: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def _sample(i: int) -> Image.Image:
    with Image.open(SAMPLE_IMAGES[i]) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Real sample JPEGs, and larger ones of several sizes and kinds (1800x1350 is over
    twice every frame, so PIL's draft decodes it at reduced DCT scale)."""
    large = _sample(0).resize((1800, 1350), Image.Resampling.BICUBIC)
    return [*(path.read_bytes() for path in SAMPLE_IMAGES[:6]),
            _encode(large, quality=90),
            _encode(_sample(1).resize((1001, 777), Image.Resampling.BICUBIC), quality=90),
            _encode(_sample(2).resize((333, 517), Image.Resampling.BICUBIC), quality=90),
            _encode(_sample(3).resize((600, 450)).convert("L"), quality=90),
            _encode(_sample(4).resize((600, 450)), quality=90, progressive=True),
            _encode(_sample(5).resize((600, 450)), quality=90, subsampling=0)]


@pytest.fixture(scope="module")
def not_for_the_device() -> list[bytes]:
    """Images the batched decoder leaves to `decode_to_frame`: PNG, CMYK JPEG, MPO (PIL
    decodes it without draft), a JPEG with bytes after its end marker, WebP."""
    mpo = _encode(_sample(8), "MPO", save_all=True, append_images=[_sample(9)])
    return [_encode(_sample(6), "PNG"), _encode(_sample(7).convert("CMYK"), quality=90), mpo,
            SAMPLE_IMAGES[10].read_bytes() + b"trailer", _encode(_sample(11), "WEBP")]


def _references(raws: list[bytes], height: int, width: int, max_pixels=None) -> np.ndarray:
    return np.stack([decode_to_frame(io.BytesIO(raw), height, width, max_pixels)
                     for raw in raws])


def _differences(pixels: torch.Tensor, references: np.ndarray) -> tuple[int, float]:
    """(largest difference, largest mean difference of one image) in uint8 levels."""
    difference = np.abs(pixels.cpu().numpy().astype(int) - references.astype(int))
    return int(difference.max()), float(difference.reshape(len(difference), -1).mean(1).max())


def _check_within(pixels: torch.Tensor, references: np.ndarray, most: float | None,
                  mean: float) -> None:
    worst, worst_mean = _differences(pixels, references)
    assert worst_mean <= mean, f"an image differs by {worst_mean:.3f} levels on average"
    assert most is None or worst <= most, f"a pixel differs by {worst} levels"


def _corrupt_huffman_table(raw: bytes) -> bytes:
    """A JPEG whose header PIL reads but whose Huffman table no decoder accepts."""
    counts = raw.index(b"\xff\xc4") + 5  # marker, length, table class and id
    return raw[:counts] + b"\xff" * 16 + raw[counts + 16:]


def _bad_rows() -> dict[str, bytes]:
    raw = SAMPLE_IMAGES[0].read_bytes()
    return {"not an image": b"hello", "truncated": raw[:len(raw) // 2],
            "bad Huffman table": _corrupt_huffman_table(raw)}


@pytest.mark.parametrize(("height", "width"), FRAMES)
def test_jpeg_rows_match_decode_to_frame_within_the_tolerance(jpegs, height, width):
    batch = decode_batch(jpegs, height, width, "cpu")
    assert batch.pixels.shape == (len(jpegs), height, width, 3)
    assert batch.pixels.dtype == torch.uint8 and batch.cpu_rows == ()
    _check_within(batch.pixels, _references(jpegs, height, width), CPU_MAX, CPU_MEAN)


def test_rows_not_for_the_device_are_exactly_the_cpu_pixels(not_for_the_device):
    batch = decode_batch(not_for_the_device, 40, 53, "cpu")
    assert batch.cpu_rows == tuple(range(len(not_for_the_device)))
    assert np.array_equal(batch.pixels.numpy(), _references(not_for_the_device, 40, 53))


def _check_mixed_batch(jpegs, not_for_the_device, device: str, max_diff, mean) -> list:
    """JPEG and fallback rows interleaved: order kept, JPEG rows within the tolerance,
    fallback rows exact. Returns the interleaved rows."""
    raws = [row for pair in zip(jpegs, not_for_the_device, strict=False) for row in pair]
    batch = decode_batch(raws, 40, 53, device)
    references = _references(raws, 40, 53)
    assert batch.cpu_rows == (1, 3, 5, 7, 9)
    _check_within(batch.pixels, references, max_diff, mean)
    cpu_rows = list(batch.cpu_rows)
    assert np.array_equal(batch.pixels.cpu().numpy()[cpu_rows], references[cpu_rows])
    return raws


def test_a_mixed_batch_keeps_row_order(jpegs, not_for_the_device):
    _check_mixed_batch(jpegs, not_for_the_device, "cpu", CPU_MAX, CPU_MEAN)


def test_rows_over_the_pixel_limit_raise_as_decode_to_frame_does(jpegs):
    with pytest.raises(CorruptImageError) as expected:
        decode_to_frame(io.BytesIO(jpegs[6]), 40, 53, max_pixels=1_000_000)
    with pytest.raises(CorruptRowError) as raised:
        decode_batch(jpegs, 40, 53, "cpu", max_pixels=1_000_000)
    assert (raised.value.row, str(raised.value)) == (6, str(expected.value))
    batch = decode_batch(jpegs[:6], 40, 53, "cpu", max_pixels=200 * 150)
    assert batch.cpu_rows == ()


@pytest.mark.parametrize("kind", sorted(_bad_rows()))
def test_a_row_that_cannot_be_decoded_raises_naming_that_row(kind):
    bad = _bad_rows()[kind]
    with pytest.raises(CorruptImageError) as expected:
        decode_to_frame(io.BytesIO(bad), 40, 53)
    raws = [path.read_bytes() for path in SAMPLE_IMAGES[:4]]
    with pytest.raises(CorruptRowError) as raised:
        decode_batch([*raws[:2], bad, *raws[2:]], 40, 53, "cpu")
    assert isinstance(raised.value, CorruptImageError)
    assert (raised.value.row, str(raised.value)) == (2, str(expected.value))


def test_the_first_bad_row_in_order_is_reported():
    """The Huffman-table row fails in the batched decoder and on the CPU after it; the
    truncated row later in the batch goes to the CPU at once, yet row 1 is named."""
    bad = _bad_rows()
    raws = [SAMPLE_IMAGES[0].read_bytes(), bad["bad Huffman table"], bad["truncated"]]
    with pytest.raises(CorruptRowError) as raised:
        decode_batch(raws, 40, 53, "cpu")
    assert raised.value.row == 1


def test_an_empty_batch_is_an_empty_tensor():
    batch = decode_batch([], 40, 53, "cpu")
    assert batch.pixels.shape == (0, 40, 53, 3) and batch.cpu_rows == ()


@cuda_test
@pytest.mark.parametrize(("height", "width"), FRAMES)
def test_on_cuda_jpeg_rows_match_decode_to_frame_within_the_tolerance(jpegs, height, width):
    batch = decode_batch(jpegs, height, width, "cuda")
    assert batch.pixels.device.type == "cuda" and batch.cpu_rows == ()
    _check_within(batch.pixels, _references(jpegs, height, width), None, CUDA_MEAN)


@cuda_test
def test_on_cuda_fallback_rows_are_exact_and_bad_rows_are_named(jpegs, not_for_the_device):
    raws = _check_mixed_batch(jpegs, not_for_the_device, "cuda", None, CUDA_MEAN)
    for kind, bad in _bad_rows().items():
        with pytest.raises(CorruptRowError) as raised:
            decode_batch([raws[0], bad, raws[2]], 40, 53, "cuda")
        assert raised.value.row == 1, kind
