"""Multi-crop and evaluation transforms: shapes, normalisation, the probabilities of each random
step measured over many draws, and reproducibility from torch's RNG alone."""

from __future__ import annotations

import io
import random

import numpy as np
import PIL.ImageFilter
import PIL.ImageOps
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from stages.dino.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCrop,
    eval_transform,
)

MEAN = np.array(IMAGENET_MEAN)[:, None, None]
STD = np.array(IMAGENET_STD)[:, None, None]


def _photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    """A synthetic RGB image with structure (gradients) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _denorm(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy() * STD + MEAN


@pytest.mark.parametrize("source", ["png", "jpeg", "pil_rgb", "pil_l", "pil_rgba", "png_l"])
def test_shapes_count_dtype(source: str) -> None:
    img = _photo()
    inputs = {
        "png": lambda: _encode(img, "PNG"),
        "jpeg": lambda: _encode(img, "JPEG"),
        "pil_rgb": lambda: img,
        "pil_l": lambda: img.convert("L"),
        "pil_rgba": lambda: img.convert("RGBA"),
        "png_l": lambda: _encode(img.convert("L"), "PNG"),
    }
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=3, global_size=24, local_size=12)
    crops = mc(inputs[source]())
    assert len(crops) == 5 == mc.ncrops
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    for c in crops:  # normalised values come from pixels in [0, 1]
        d = _denorm(c)
        assert d.min() >= -1e-6 and d.max() <= 1 + 1e-6


def test_one_global_crop_and_no_locals() -> None:
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=0, global_size=16, local_size=8,
                   global_crops_number=1)
    crops = mc(_photo())
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)]


def test_reference_defaults() -> None:
    mc = MultiCrop()
    crops = mc(_photo(64, 48))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    rrc = [mc.global_transforms[0].transforms[0], mc.local_transform.transforms[0]]
    assert [r.scale for r in rrc] == [(0.4, 1.0), (0.05, 0.4)]
    assert all(r.interpolation == transforms.InterpolationMode.BICUBIC for r in rrc)


def test_blur_radius_reaches_every_view() -> None:
    mc = MultiCrop(local_crops_number=2, global_size=32, local_size=16, blur_radius=(0.05, 0.3))
    blurs = [t.transforms[4] for t in mc.global_transforms] + [mc.local_transform.transforms[4]]
    assert [(b.radius_min, b.radius_max) for b in blurs] == [(0.05, 0.3)] * 3


def test_normalisation_of_a_gray_image() -> None:
    """A constant gray image stays constant and gray through every step (crop, flip, jitter, gray,
    blur, solarise), so after undoing the ImageNet normalisation the three channels agree."""
    torch.manual_seed(0)
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=2, global_size=16, local_size=8)
    img = Image.new("L", (20, 20), 90)
    for _ in range(20):
        for crop in mc(img):
            d = _denorm(crop)
            assert np.ptp(d, axis=(1, 2)).max() < 1e-6  # each channel constant
            assert np.ptp(d[:, 0, 0]) < 1e-6  # gray: the channels equal
            assert np.isclose(d[0, 0, 0] * 255, round(d[0, 0, 0] * 255), atol=1e-4)  # an 8-bit value


def test_eval_transform_constant_colour_is_exact() -> None:
    img = Image.new("RGB", (50, 30), (200, 100, 30))
    out = eval_transform(24, 16)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (np.array([200, 100, 30]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.double().numpy(), np.broadcast_to(expected[:, None, None], (3, 16, 16)),
                               rtol=0, atol=1e-6)


def test_eval_transform_is_resize_shorter_side_then_center_crop() -> None:
    img = _photo(45, 30)
    t = EvalTransform(resize=20, crop_size=16)
    got = t(_encode(img, "PNG"))
    # by hand with PIL: shorter side 30 -> 20, longer 45 -> 30; then the central 16×16
    resized = np.asarray(img.resize((30, 20), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    top, left = round((20 - 16) / 2), round((30 - 16) / 2)
    crop = resized[top:top + 16, left:left + 16].transpose(2, 0, 1)
    np.testing.assert_allclose(got.double().numpy(), (crop - MEAN) / STD, rtol=0, atol=1e-5)
    gray = t(img.convert("L"))
    assert gray.shape == (3, 16, 16)
    np.testing.assert_allclose(_denorm(gray)[0], _denorm(gray)[2], atol=1e-6)


def test_bytes_and_pil_give_the_same_crops() -> None:
    img = _photo()
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=2, global_size=16, local_size=8)
    torch.manual_seed(3)
    from_pil = mc(img)
    torch.manual_seed(3)
    from_png = mc(_encode(img, "PNG"))
    torch.manual_seed(3)
    from_bytearray = mc(bytearray(_encode(img, "PNG")))
    for a, b, c in zip(from_pil, from_png, from_bytearray):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_torch_seed_alone_reproduces_crops() -> None:
    img = _encode(_photo(), "PNG")
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=4, global_size=16, local_size=8)
    runs = []
    for py_seed in (1, 2):
        random.seed(py_seed)  # Python's RNG must play no part
        np.random.seed(py_seed)
        torch.manual_seed(42)
        runs.append([mc(img) for _ in range(5)])
    for a, b in zip(runs[0], runs[1]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.manual_seed(43)
    other = mc(img)
    assert any(not torch.equal(x, y) for x, y in zip(other, runs[0][0]))


def test_random_step_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blur (1.0 / 0.1 / 0.5), solarisation (global 2: 0.2), flip (0.5) and colour jitter (0.8),
    counted over many draws on a small image; tolerances are ~4.5 standard deviations."""
    counts = {"blur": 0, "solarize": 0, "flip": 0, "jitter": 0}
    radii: list[float] = []
    real_blur, real_solarize, real_hflip = PIL.ImageFilter.GaussianBlur, PIL.ImageOps.solarize, TF.hflip
    real_jitter = transforms.ColorJitter.forward

    def blur(radius: float = 2) -> PIL.ImageFilter.Filter:
        counts["blur"] += 1
        radii.append(radius)
        return real_blur(radius)

    def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
        counts["solarize"] += 1
        assert threshold == 128
        return real_solarize(img, threshold)

    def hflip(img):
        counts["flip"] += 1
        return real_hflip(img)

    def jitter(self, img):
        counts["jitter"] += 1
        return real_jitter(self, img)

    monkeypatch.setattr(PIL.ImageFilter, "GaussianBlur", blur)
    monkeypatch.setattr(PIL.ImageOps, "solarize", solarize)
    monkeypatch.setattr(TF, "hflip", hflip)
    monkeypatch.setattr(transforms.ColorJitter, "forward", jitter)

    torch.manual_seed(0)
    mc = MultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=1, global_size=6, local_size=4)
    img = _photo(12, 12)
    n = 800
    views = {"global1": mc.global_transforms[0], "global2": mc.global_transforms[1], "local": mc.local_transform}
    expected = {
        "global1": {"blur": 1.0, "solarize": 0.0},
        "global2": {"blur": 0.1, "solarize": 0.2},
        "local": {"blur": 0.5, "solarize": 0.0},
    }
    for name, view in views.items():
        for key in counts:
            counts[key] = 0
        for _ in range(n):
            view(img)
        rates = {k: v / n for k, v in counts.items()}
        want = expected[name] | {"flip": 0.5, "jitter": 0.8}
        for key, p in want.items():
            tol = 4.5 * np.sqrt(max(p * (1 - p), 1e-12) / n)
            assert abs(rates[key] - p) <= tol, (name, key, rates[key], p)
    assert min(radii) >= 0.1 and max(radii) <= 2.0
    assert abs(np.mean(radii) - 1.05) < 4.5 * (1.9 / np.sqrt(12)) / np.sqrt(len(radii))


def test_solarised_view_inverts_bright_pixels() -> None:
    """Global 2 differs from the others by solarisation: with all other steps disabled by a
    transform that only solarises, pixels >= 128 become 255 - v (PIL semantics, threshold 128)."""
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(arr, "L").convert("RGB")
    out = np.asarray(PIL.ImageOps.solarize(img, 128))[..., 0].astype(int)
    assert np.array_equal(out, np.where(arr >= 128, 255 - arr.astype(int), arr))
    mc = MultiCrop(global_size=8, local_size=4, local_crops_number=0)
    sol_steps = [type(s).__name__ for s in mc.global_transforms[1].transforms]
    assert "RandomSolarize" in sol_steps
    assert "RandomSolarize" not in [type(s).__name__ for s in mc.global_transforms[0].transforms]
    assert "RandomSolarize" not in [type(s).__name__ for s in mc.local_transform.transforms]


def test_bad_input_and_arguments() -> None:
    mc = MultiCrop(global_size=8, local_size=4, local_crops_number=1)
    with pytest.raises(ValueError, match="cannot decode"):
        mc(b"not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        mc(_encode(_photo(), "PNG")[:60])  # truncated
    with pytest.raises(ValueError, match="PIL image"):
        mc(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="global_crops_number"):
        MultiCrop(global_crops_number=3)
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCrop(local_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCrop(local_crops_number=-1)
