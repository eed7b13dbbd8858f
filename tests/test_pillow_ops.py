"""stages.dino._pillow_ops (C) against Pillow itself: every colour for the colour operations, random
crops, sizes and radii for the resize and the blur; byte for byte, since LeanMultiCrop's views must
equal the reference's (torchvision's PIL functions) given the same parameters."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter

from stages.dino._pillow_ops import color_jitter, gaussian_blur, normalize_planes, resized_crop
from stages.dino.augment_lean import _normalize, normalize_views

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@pytest.fixture(scope="module")
def every_colour() -> np.ndarray:
    """All 2^24 RGB colours as a 4096 x 4096 image."""
    code = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([code >> 16, (code >> 8) & 255, code & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)


def _jitter(pixels: np.ndarray, op: int | None, factor: float = 1.0, gray: bool = False) -> np.ndarray:
    out = pixels.copy()
    factors = [1.0, 1.0, 1.0]
    hue_shift = 0
    if op == HUE:
        hue_shift = int(factor * 255) % 256
    elif op is not None:
        factors[op] = factor
    color_jitter(out, b"" if op is None else bytes([op]), *factors, hue_shift, gray)
    return out


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.0031, 0.0, 0.1])
def test_hue_shift_equals_torchvision_for_every_colour(every_colour: np.ndarray, factor: float) -> None:
    expected = np.asarray(TF.adjust_hue(Image.fromarray(every_colour), factor))
    np.testing.assert_array_equal(_jitter(every_colour, HUE, factor), expected)


@pytest.mark.parametrize(("op", "enhance"), [(BRIGHTNESS, ImageEnhance.Brightness),
                                             (CONTRAST, ImageEnhance.Contrast),
                                             (SATURATION, ImageEnhance.Color)])
@pytest.mark.parametrize("factor", [0.0, 0.6137, 1.0, 1.3999])  # Image.blend's two branches and shortcuts
def test_enhance_equals_pillow_for_every_colour(every_colour: np.ndarray, op: int, enhance, factor: float) -> None:
    expected = np.asarray(enhance(Image.fromarray(every_colour)).enhance(factor))
    np.testing.assert_array_equal(_jitter(every_colour, op, factor), expected)


def test_grayscale_equals_pillow_for_every_colour(every_colour: np.ndarray) -> None:
    expected = np.asarray(Image.fromarray(every_colour).convert("L").convert("RGB"))
    np.testing.assert_array_equal(_jitter(every_colour, None, gray=True), expected)


def test_contrast_uses_the_mean_of_the_current_image() -> None:
    """The contrast's gray level is the rounded mean luma of the image as the earlier operations
    left it, so the order matters; all four in one call equal the chain of Pillow calls."""
    pixels = np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    img = TF.adjust_hue(ImageEnhance.Contrast(ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.31))
                                              .enhance(0.83)).enhance(0.71), -0.07)
    out = pixels.copy()
    color_jitter(out, bytes([BRIGHTNESS, SATURATION, CONTRAST, HUE]), 1.31, 0.71, 0.83, int(-0.07 * 255) % 256, False)
    np.testing.assert_array_equal(out, np.asarray(img))


def _photo(width: int = 500, height: int = 375) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(1).normal(0, 40, (height, width, 3))
    smooth = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin(x / 17.0 + y / 23.0)], axis=-1)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def test_resized_crop_equals_pillow_on_random_boxes() -> None:
    """Down- and upscales, sizes equal to the crop's width or height (a pass skipped), flips, both
    of Pillow 13's pass orders (vertical first when the height shrinks > 2x more than the width)."""
    pixels = _photo()
    img = Image.fromarray(pixels)
    rng = np.random.default_rng(0)
    vertical_first = 0
    for trial in range(300):
        w, h = int(rng.integers(1, 501)), int(rng.integers(1, 376))
        left, top = int(rng.integers(0, 501 - w)), int(rng.integers(0, 376 - h))
        size = [224, 96, 28, 7, w, h][trial % 6]
        flip = trial % 4 == 0
        expected = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.empty((size, size, 3), dtype=np.uint8)
        resized_crop(pixels, 375, 500, (left, top, left + w, top + h), out, size, flip)
        np.testing.assert_array_equal(out, np.asarray(expected), err_msg=f"box {(left, top, w, h)} size {size}")
        vertical_first += h - size > 0 and h - size > 2 * (w - size)
    assert 20 < vertical_first < 280


def test_gaussian_blur_equals_pillow() -> None:
    rng = np.random.default_rng(0)
    for trial in range(150):
        h, w = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        radius = float(rng.uniform(0.1, 2.0)) if trial % 5 else float(rng.uniform(0.0, 40.0))  # incl. > size
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if trial % 2 else _photo(w, h)
        expected = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=radius)))
        out = pixels.copy()
        gaussian_blur(out, h, w, radius)
        np.testing.assert_array_equal(out, expected, err_msg=f"{h}x{w} radius {radius}")


def test_normalize_views_equals_the_formula_on_cpu() -> None:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    views = torch.randint(0, 256, (4, 3, 17, 9), dtype=torch.uint8)
    for view in (views, views.permute(0, 1, 3, 2)):  # contiguous and strided
        (ours,) = normalize_views([view])
        assert torch.equal(ours, _normalize(view, mean, std))


def test_bad_buffers_raise_value_errors_naming_the_function() -> None:
    pixels = np.zeros((4, 5, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="color_jitter: expected a C-contiguous"):
        color_jitter(np.zeros(7, dtype=np.uint8), b"", 1, 1, 1, 0, False)
    with pytest.raises(ValueError, match="color_jitter: unknown operation 4"):
        color_jitter(pixels, b"\x04", 1, 1, 1, 0, False)
    with pytest.raises(ValueError, match="resized_crop: the crop box must lie inside"):
        resized_crop(pixels, 4, 5, (0, 0, 6, 4), np.empty((2, 2, 3), np.uint8), 2, False)
    with pytest.raises(ValueError, match="resized_crop: the output must be"):
        resized_crop(pixels, 4, 5, (0, 0, 5, 4), np.empty((2, 3, 3), np.uint8), 2, False)
    with pytest.raises(ValueError, match="gaussian_blur: expected a C-contiguous 4 x 6"):
        gaussian_blur(pixels, 4, 6, 1.0)
    with pytest.raises(ValueError, match="normalize_planes: expected float32 output"):
        normalize_planes(pixels, np.empty(3, np.float32), np.empty((3, 256), np.float32), 20, 3)
    with pytest.raises(TypeError):
        resized_crop(io.BytesIO(), 4, 5, (0, 0, 5, 4), np.empty((2, 2, 3), np.uint8), 2, False)
