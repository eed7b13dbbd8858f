"""LeanMultiCrop: each view equals torchvision's PIL functions given the same parameters (bit for
bit), the parameters follow torchvision's distributions, and torch's seed alone reproduces them."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from stages.dino.augment import MultiCrop, normalize
from stages.dino.augment_lean import (
    DRAWS_PER_VIEW,
    LeanMultiCrop,
    ViewParams,
    normalize_views,
    render_view,
    sample_view,
)


def _photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 30, arr.shape), 0, 255).astype(np.uint8), "RGB")


def _torchvision_view(img: Image.Image, view: ViewParams, size: int) -> Image.Image:
    """The same view through torchvision's functional API (what its transform modules call)."""
    left, top, right, bottom = view.box
    out = TF.resized_crop(img, top, left, bottom - top, right - left, [size, size],
                          transforms.InterpolationMode.BICUBIC)
    if view.flip:
        out = TF.hflip(out)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op, factor in view.jitter:
        out = adjust[op](out, factor)
    if view.gray:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if view.blur_radius is not None:
        out = out.filter(ImageFilter.GaussianBlur(radius=view.blur_radius))
    if view.solarize:
        out = ImageOps.solarize(out, threshold=128)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_view_equals_torchvision_functions_bit_for_bit(seed: int) -> None:
    img = _photo(seed=seed)
    rng = np.random.default_rng(seed)
    ops = list(rng.permutation(4)[: rng.integers(0, 5)])
    factors = {0: rng.uniform(0.6, 1.4), 1: rng.uniform(0.6, 1.4), 2: rng.uniform(0.8, 1.2), 3: rng.uniform(-0.1, 0.1)}
    left, top = int(rng.integers(0, 20)), int(rng.integers(0, 15))
    view = ViewParams(box=(left, top, left + int(rng.integers(8, 44)), top + int(rng.integers(8, 33))),
                      flip=bool(seed % 2), jitter=tuple((int(op), float(factors[op])) for op in ops),
                      gray=seed % 3 == 0, blur_radius=float(rng.uniform(0.1, 2.0)) if seed % 4 else None,
                      solarize=seed % 5 == 0)
    for size in (16, 24):
        ours = render_view(np.asarray(img), view, size)
        theirs = np.array(_torchvision_view(img, view, size))
        np.testing.assert_array_equal(ours, theirs)


def test_negative_hue_shift_wraps_like_torchvision() -> None:
    img = _photo()
    for factor in (-0.1, -0.0031, 0.0, 0.0031, 0.1):
        view = ViewParams((0, 0, 64, 48), False, ((3, factor),), False, None, False)
        np.testing.assert_array_equal(render_view(np.asarray(img), view, 32),
                                      np.array(TF.adjust_hue(img.resize((32, 32), Image.BICUBIC), factor)))


def _draws(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, DRAWS_PER_VIEW))


def test_crop_boxes_follow_random_resized_crop() -> None:
    """Area fraction and log aspect ratio: same quantiles as torchvision's get_params (20k draws)."""
    img, scale, n = _photo(500, 375), (0.05, 0.4), 20_000
    ours = [sample_view(u, 500, 375, scale, 0.5, 0.0).box for u in _draws(n)]
    torch.manual_seed(0)
    theirs = []
    for _ in range(n):
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
        theirs.append((left, top, left + w, top + h))

    def stats(boxes):
        b = np.array(boxes, dtype=np.float64)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        centre_x = (b[:, 0] + b[:, 2]) / 2 / 500
        return [np.quantile(x, q) for x in (w * h / (500 * 375), np.log(w / h), centre_x) for q in (0.1, 0.5, 0.9)]

    np.testing.assert_allclose(stats(ours), stats(theirs), atol=0.012)
    assert all(0 <= l < r <= 500 and 0 <= t < b <= 375 for l, t, r, b in ours)


@pytest.mark.parametrize("size, scale, u_ratio, box", [
    ((200, 20), (0.99, 1.0), 0.999, (86, 0, 113, 20)),  # too wide: height kept, width 20 * 4/3
    ((20, 200), (0.99, 1.0), 0.999, (0, 86, 20, 113)),  # too tall: width kept, height 20 / (3/4)
    ((60, 50), (1.0, 1.0), 0.0, (0, 0, 60, 50)),  # ratio 3/4 at full area never fits: whole image
])
def test_crop_fallback_is_the_central_crop(size, scale, u_ratio, box) -> None:
    """When no try fits, torchvision's central fallback (boxes by hand; the first two are also
    what get_params returns, since no try can fit there whatever its draws)."""
    u = np.full(DRAWS_PER_VIEW, 0.999)
    u[1:40:4] = u_ratio
    assert sample_view(u, *size, scale, 0.0, 0.0).box == box
    if u_ratio:
        top, left, h, w = transforms.RandomResizedCrop.get_params(Image.new("RGB", size), list(scale), [3 / 4, 4 / 3])
        assert (left, top, left + w, top + h) == box


def test_step_probabilities_and_ranges() -> None:
    n = 40_000
    views = [sample_view(u, 64, 48, (0.4, 1.0), 0.5, 0.2, (0.1, 2.0)) for u in _draws(n, seed=1)]
    rate = lambda flags: float(np.mean(flags))  # noqa: E731
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(rate([v.flip for v in views]) - 0.5) < tol
    assert abs(rate([bool(v.jitter) for v in views]) - 0.8) < tol
    assert abs(rate([v.gray for v in views]) - 0.2) < tol
    assert abs(rate([v.blur_radius is not None for v in views]) - 0.5) < tol
    assert abs(rate([v.solarize for v in views]) - 0.2) < tol
    jittered = [v.jitter for v in views if v.jitter]
    orders = {tuple(op for op, _ in j) for j in jittered}
    assert orders == set(itertools.permutations(range(4)))
    counts = np.array([sum(tuple(op for op, _ in j) == o for j in jittered) for o in sorted(orders)])
    assert abs(counts / len(jittered) - 1 / 24).max() < 0.01
    ranges = {0: (0.6, 1.4), 1: (0.6, 1.4), 2: (0.8, 1.2), 3: (-0.1, 0.1)}
    for op, (lo, hi) in ranges.items():
        values = np.array([f for j in jittered for o, f in j if o == op])
        assert lo <= values.min() and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 0.01 * (hi - lo)
    radii = np.array([v.blur_radius for v in views if v.blur_radius is not None])
    assert 0.1 <= radii.min() and radii.max() <= 2.0 and abs(radii.mean() - 1.05) < 0.02


def test_views_kinds_shapes_and_seed() -> None:
    lean = LeanMultiCrop((0.4, 1.0), (0.05, 0.4), local_crops_number=3, global_size=24, local_size=12)
    buf = io.BytesIO()
    _photo().convert("L").save(buf, "PNG")
    torch.manual_seed(3)
    first = lean(buf.getvalue())
    torch.manual_seed(3)
    again = lean(_photo().convert("L"))
    assert [tuple(v.shape) for v in first] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(v.dtype == torch.uint8 for v in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert lean.ncrops == MultiCrop(local_crops_number=3).ncrops == 5
    blur_p = [view[2] for view in lean.views]
    assert blur_p == [1.0, 0.1, 0.5, 0.5, 0.5] and [view[3] for view in lean.views] == [0.0, 0.2, 0, 0, 0]


def test_normalize_views_equals_to_tensor_and_normalize() -> None:
    img = _photo()
    batch = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    (ours,) = normalize_views([batch])
    assert torch.equal(ours[1], normalize()(img))


def test_bad_arguments_name_the_class() -> None:
    with pytest.raises(ValueError, match="LeanMultiCrop: global_crops_scale"):
        LeanMultiCrop(global_crops_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="cannot decode image"):
        LeanMultiCrop()(b"not an image")


def test_a_missing_extension_is_named_with_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module needs no extension (the pretrain stage imports it for every run);
    using LeanMultiCrop without one says how to build it."""
    import sys

    import stages.dino

    monkeypatch.delattr(stages.dino, "_pillow_ops", raising=False)
    monkeypatch.setitem(sys.modules, "stages.dino._pillow_ops", None)
    with pytest.raises(ImportError, match="not built: `pip install -e .`"):
        LeanMultiCrop(local_crops_number=1, global_size=16, local_size=8)(_photo())
