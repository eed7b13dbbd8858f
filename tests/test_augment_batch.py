"""Batched multi-crop (stages/dino/augment_batch.py) against torchvision, PIL and the reference's
probabilities (DataAugmentationDINO)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms

from host_waits import HostWaits
from stages.dino import augment_batch as ab
from stages.dino.augment_batch import BatchMultiCrop

MEAN = torch.tensor((0.485, 0.456, 0.406)).reshape(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).reshape(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """skimage's astronaut, resized to an ImageNet-like 200 x 150 (H=150), uint8 (H, W, 3)."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((200, 150), Image.BICUBIC)).copy()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def denormalise(view: torch.Tensor) -> torch.Tensor:
    return view * STD + MEAN


def binomial_ok(hits: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.fixture(params=["cpu", "gpu"])
def arrangement(request, monkeypatch) -> str:
    """Run BatchMultiCrop as on the CPU, or with the GPU's arrangement of the work (whole batch,
    views of one size drawn and rendered together, torch.where selection) on the CPU."""
    if request.param == "gpu":
        monkeypatch.setattr(ab, "_on_cpu", lambda images: False)
    return request.param


# ----------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------


def test_shapes_dtypes_order_and_device_checks():
    images = torch.randint(0, 256, (5, 3, 40, 30), dtype=torch.uint8)
    aug = BatchMultiCrop((0.4, 1.0), (0.05, 0.4), 3, global_size=24, local_size=12)
    crops = aug(images, gen())
    assert aug.ncrops == 5 and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 3
    assert all(c.dtype == torch.float32 and c.is_contiguous() for c in crops)
    assert [v[3] for v in aug.views] == [0.0, 0.2, 0.0, 0.0, 0.0]  # solarisation: global 2 only
    assert [v[2] for v in aug.views] == [1.0, 0.1, 0.5, 0.5, 0.5]  # blur p per view
    one = BatchMultiCrop(local_crops_number=0, global_size=16, global_crops_number=1)
    assert [tuple(c.shape) for c in one(images, gen())] == [(5, 3, 16, 16)]
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), gen())
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="global_crops_scale"):
        BatchMultiCrop((0.0, 1.0))
    with pytest.raises(ValueError, match="resample"):
        BatchMultiCrop(resample="nearest")


def test_same_seed_same_bits_and_chunking_does_not_matter(monkeypatch):
    images = torch.randint(0, 256, (7, 3, 20, 26), dtype=torch.uint8)
    aug = BatchMultiCrop((0.3, 1.0), (0.1, 0.5), 2, global_size=16, local_size=8)
    first, second = aug(images, gen(3)), aug(images, gen(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = aug(images, gen(4))
    assert not torch.allclose(first[0], other[0])
    monkeypatch.setattr(ab, "CPU_CHUNK_ELEMENTS", 1)  # one image per chunk
    chunked = aug(images, gen(3))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, chunked))


def test_generator_state_resumes_exactly():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    aug = BatchMultiCrop(global_size=8, local_size=4, local_crops_number=1)
    g = gen(11)
    aug(images, g)
    state = g.get_state()
    expected = aug(images, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, aug(images, resumed)))


# ----------------------------------------------------------------------------------------------
# Crop boxes: the distribution of RandomResizedCrop.get_params
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.4, 1.0)), (375, 500, (0.05, 0.4)),
                                                (28, 28, (0.14, 1.0)), (20, 90, (0.5, 1.0))])
def test_crop_boxes_match_torchvision_distribution(height, width, scale):
    n = 3000
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    ref = np.array([transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                    for _ in range(n)], dtype=np.float64)
    top, left, h, w = (t.numpy().astype(np.float64) for t in
                       ab.sample_crop_boxes(n, height, width, scale, gen(1)))
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    ours = {"area": h * w / (height * width), "logratio": np.log(w / h),
            "top": top / height, "left": left / width}
    theirs = {"area": ref[:, 2] * ref[:, 3] / (height * width), "logratio": np.log(ref[:, 3] / ref[:, 2]),
              "top": ref[:, 0] / height, "left": ref[:, 1] / width}
    for key in ours:
        result = stats.ks_2samp(ours[key], theirs[key])
        assert result.pvalue > 1e-4, (key, result)
        q = [0.1, 0.5, 0.9]
        assert np.allclose(np.quantile(ours[key], q), np.quantile(theirs[key], q), atol=0.05), key


def test_crop_fallback_is_torchvision_central_crop():
    # 10 x 200 with scale (0.9, 1) never fits the ratio range: always the fallback central crop.
    torch.manual_seed(0)
    expected = transforms.RandomResizedCrop.get_params(torch.empty(1, 10, 200), [0.9, 1.0], [3 / 4, 4 / 3])
    top, left, h, w = ab.sample_crop_boxes(50, 10, 200, (0.9, 1.0), gen())
    assert expected == (int((10 - 10) // 2), int((200 - round(10 * 4 / 3)) // 2), 10, round(10 * 4 / 3))
    assert set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist())) == {expected}


# ----------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------


def test_resize_matrices_equal_torch_antialiased_bicubic(photo):
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    top, left, h, w = ab.sample_crop_boxes(12, 150, 200, (0.05, 1.0), gen(2))
    for size in (96, 33, 224):  # down- and up-sampling
        rows = ab.resize_matrices(top, h, 150, size)
        cols = ab.resize_matrices(left, w, 200, size)
        ours = rows[:, None] @ images @ cols[:, None].transpose(-1, -2)
        for b in range(12):
            ref = TF.resized_crop(images[0], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size],
                                  interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            assert torch.allclose(ours[b], ref, atol=2e-3), (size, b)  # 0..255 scale


@pytest.mark.parametrize("mode", ["matmul", "interpolate"])
def test_resized_crop_matches_pil(photo, mode):
    """Both implementations against PIL's 8-bit bicubic resize of the crop (the reference's)."""
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].expand(16, -1, -1, -1).contiguous()
    top, left, h, w = ab.sample_crop_boxes(16, 150, 200, (0.05, 1.0), gen(5))
    flip = torch.arange(16) % 2 == 1
    fn = ab.resized_crop_matmul if mode == "matmul" else ab.resized_crop_interpolate
    ours = fn(images, top, left, h, w, 64, flip) * 255
    diffs = []
    for b in range(16):
        box = (int(left[b]), int(top[b]), int(left[b] + w[b]), int(top[b] + h[b]))
        pil = Image.fromarray(photo).crop(box).resize((64, 64), Image.BICUBIC)
        if flip[b]:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        diffs.append((ours[b] - torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)).abs())
    diffs = torch.stack(diffs)
    assert torch.allclose(ours, ours.round(), atol=1e-3)  # 8-bit values, as PIL's
    assert (diffs == 0).float().mean() > 0.9
    assert diffs.mean() < 0.1 and diffs.max() <= 6


def test_flip_is_the_mirrored_crop(photo):
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].expand(4, -1, -1, -1).contiguous()
    top, left, h, w = ab.sample_crop_boxes(4, 150, 200, (0.2, 1.0), gen(6))
    plain = ab.resized_crop_matmul(images, top, left, h, w, 32)
    flipped = ab.resized_crop_matmul(images, top, left, h, w, 32, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Colour, grayscale, blur, solarisation
# ----------------------------------------------------------------------------------------------


def colour_batch(n: int = 6, size: int = 17) -> torch.Tensor:
    images = torch.rand(n, 3, size, size, generator=gen(7))
    images[0, :, :4] = 0.5  # gray pixels (hue undefined)
    images[1, 0] = 1.0  # saturated channel
    return images


@pytest.mark.parametrize("name,factors", [
    ("brightness", [0.6, 1.0, 1.4, 0.8, 1.2, 0.95]),
    ("contrast", [0.6, 1.0, 1.4, 0.8, 1.2, 0.95]),
    ("saturation", [0.8, 1.0, 1.2, 0.9, 1.1, 0.85]),
    ("hue", [-0.1, 0.0, 0.1, 0.05, -0.07, 0.5]),
])
def test_colour_ops_match_torchvision_v2(name, factors):
    images = colour_batch()
    ours = getattr(ab, f"adjust_{name}")(images, torch.tensor(factors))
    ref_fn = getattr(TF, f"adjust_{name}")
    for b, f in enumerate(factors):
        ref = ref_fn(images[b], f)
        assert torch.allclose(ours[b], ref, atol=2e-6), (name, f, (ours[b] - ref).abs().max())


def test_color_jitter_applies_the_per_sample_order(arrangement):
    images = colour_batch()
    factors = torch.tensor([[0.7, 1.3, 0.85, 0.08]] * 6)
    orders = torch.stack([torch.randperm(4, generator=gen(s)) for s in range(6)])
    ours = ab.color_jitter(images, factors, orders)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(6):
        ref = images[b]
        for op in orders[b].tolist():  # torchvision's ColorJitter.forward loop
            ref = fns[op](ref, float(factors[b, op]))
        assert torch.allclose(ours[b], ref, atol=5e-6)
    assert torch.equal(images, colour_batch())  # the input is left alone


def test_color_jitter_arrangements_agree_bit_for_bit():
    """The GPU's one blend per position is each operation's own arithmetic, not an approximation."""
    images = torch.rand(64, 3, 6, 5, generator=gen(20))
    factors = torch.stack([torch.empty(64).uniform_(lo, hi, generator=gen(21 + i))
                           for i, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)])], dim=1)
    orders = torch.rand(64, 4, generator=gen(25)).argsort(dim=1)
    assert torch.equal(ab._color_jitter_selected(images, factors, orders), ab.color_jitter(images, factors, orders))


def test_gray_jitter_equals_three_channel_jitter():
    """One-channel gray images take the affine form of ColorJitter; the 3-channel ops are the truth."""
    gray = torch.rand(8, 1, 9, 7, generator=gen(3))
    factors = torch.stack([torch.empty(8).uniform_(0.6, 1.4, generator=gen(4)),
                           torch.empty(8).uniform_(0.6, 1.4, generator=gen(5)),
                           torch.empty(8).uniform_(0.8, 1.2, generator=gen(6)),
                           torch.empty(8).uniform_(-0.1, 0.1, generator=gen(7))], dim=1)
    orders = torch.stack([torch.randperm(4, generator=gen(s)) for s in range(8)])
    jitter = torch.tensor([True, False] * 4)
    ours = ab.color_jitter_gray(gray, factors, orders, jitter)
    rgb = gray.expand(-1, 3, -1, -1)
    expected = torch.where(jitter[:, None, None, None], ab.color_jitter(rgb, factors, orders), rgb)
    assert torch.allclose(ours.expand(-1, 3, -1, -1), expected, atol=2e-6)
    assert torch.equal(ours[~jitter], gray[~jitter])  # untouched samples are bit-identical


def test_grayscale_is_luma_on_three_channels():
    images = colour_batch()
    gray = ab.rgb_to_grayscale(images)
    assert torch.allclose(gray, TF.rgb_to_grayscale(images, num_output_channels=1), atol=1e-7)
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    assert torch.allclose(gray[:, 0], 0.2989 * r + 0.587 * g + 0.114 * b, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_blur_matches_pil_gaussian_blur(photo, sigma):
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    ours = ab.pil_gaussian_blur(images, torch.tensor([sigma]))[0].permute(1, 2, 0).numpy() * 255
    pil = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float64)
    diff = np.abs(ours - pil)
    # PIL rounds to 8 bits after each of its 6 box passes; ours stays in float.
    assert diff.max() <= 3.0 and diff.mean() <= 0.6, (diff.max(), diff.mean())
    # A sampled Gaussian (torchvision's gaussian_blur) is much further from PIL's filter.
    k = 2 * math.ceil(3 * sigma) + 1
    gauss = TF.gaussian_blur(images[0], [k, k], [sigma, sigma]).permute(1, 2, 0).numpy() * 255
    if sigma >= 0.5:
        assert np.abs(gauss - pil).max() > 2 * diff.max()


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_small_images_blur_as_matrices_like_pil(photo, sigma):
    small = np.ascontiguousarray(photo[40:88, 60:100])  # 48 x 40: the matrix path
    images = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255
    assert max(images.shape[-2:]) <= ab.BLUR_MATMUL_MAX_SIDE
    ours = ab.pil_gaussian_blur(images, torch.tensor([sigma]))
    shifted = ab._blur_shifted_adds(images, torch.tensor([sigma]), ab.BLUR_RADIUS[1], ab.BLUR_PASSES)
    assert torch.allclose(ours, shifted, atol=1e-6)
    pil = np.asarray(Image.fromarray(small).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float64)
    diff = np.abs(ours[0].permute(1, 2, 0).numpy() * 255 - pil)
    assert diff.max() <= 3.0 and diff.mean() <= 0.6, (diff.max(), diff.mean())


def test_blur_matrix_by_hand():
    """sigma = sqrt(2/3), one pass: variance 2/3 gives box radius exactly 1 (taps 1/3, 1/3, 1/3)."""
    one_pass = ab.blur_matrices(torch.tensor([math.sqrt(2 / 3)]), 4, sigma_max=2.0, passes=1)[0]
    third = 1 / 3
    expected = torch.tensor([[2 * third, third, 0, 0],  # the left edge replicated
                             [third, third, third, 0],
                             [0, third, third, third],
                             [0, 0, third, 2 * third]])
    assert torch.allclose(one_pass, expected, atol=1e-6)
    three = ab.blur_matrices(torch.tensor([1.0, 2.0]), 10)
    assert torch.allclose(three.sum(-1), torch.ones(2, 10), atol=1e-6)


def test_blur_box_radius_is_pils_formula():
    for sigma in (0.1, 0.7, 1.3, 2.0):
        var = sigma ** 2 / 3
        box = math.sqrt(12 * var + 1)
        whole = math.floor((box - 1) / 2)
        frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
        got = float(ab.pil_box_radius(torch.tensor(sigma, dtype=torch.float64)))
        assert got == pytest.approx(whole + frac, abs=1e-12)


def test_solarize_inverts_values_from_128():
    values = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 255
    expected = torch.where(torch.arange(256) >= 128, 255 - torch.arange(256), torch.arange(256))
    assert torch.allclose(ab.solarize(values).flatten() * 255, expected.float(), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Probabilities, measured on the outputs of BatchMultiCrop
# ----------------------------------------------------------------------------------------------


def test_draw_probabilities():
    n = 20000
    d = ab.draw_views(n, 30, 30, [(30, (0.4, 1.0), 0.1, 0.2)], gen(8))
    for mask, p in ((d.flip, 0.5), (d.jitter, 0.8), (d.gray, 0.2), (d.blur, 0.1), (d.solarize, 0.2)):
        assert binomial_ok(int(mask.sum()), n, p)
    assert d.factors[:, :3].min() >= 0.6 and d.factors[:, 0].max() <= 1.4
    assert d.factors[:, 2].min() >= 0.8 and d.factors[:, 2].max() <= 1.2
    assert d.factors[:, 3].abs().max() <= 0.1 and d.sigma.min() >= 0.1 and d.sigma.max() <= 2.0
    assert stats.kstest(d.factors[:, 1].numpy(), "uniform", args=(0.6, 0.8)).pvalue > 1e-4
    assert stats.kstest(d.sigma.numpy(), "uniform", args=(0.1, 1.9)).pvalue > 1e-4
    # ColorJitter orders: every one of the 24 permutations, uniformly.
    codes = (d.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts.numpy()).pvalue > 1e-4
    assert ab.draw_views(10, 30, 30, [(30, (0.4, 1.0), 0.5, 0.0)] * 2, gen()).solarize is None


def test_views_drawn_together_keep_their_own_parameters():
    """Several views in one draw (the GPU's groups): view-major samples, each view with its own
    crop scale, blur and solarisation probability."""
    n = 20000
    views = [(30, (0.4, 1.0), 1.0, 0.0), (30, (0.4, 1.0), 0.1, 0.2), (30, (0.05, 0.4), 0.5, 0.0)]
    d = ab.draw_views(n, 30, 30, views, gen(16))
    assert d.top.shape == d.sigma.shape == (3 * n,) and d.order.shape == (3 * n, 4)
    for v, (_, scale, blur_p, solarize_p) in enumerate(views):
        part = d[v * n:(v + 1) * n]
        assert binomial_ok(int(part.blur.sum()), n, blur_p) and binomial_ok(int(part.solarize.sum()), n, solarize_p)
        assert binomial_ok(int(part.flip.sum()), n, 0.5) and binomial_ok(int(part.gray.sum()), n, 0.2)
        area = (part.height * part.width).double() / 900
        assert area.min() >= scale[0] - 0.05 and area.max() <= scale[1] + 0.05
    one = ab.draw_views(n, 30, 30, views[2:], gen(17))  # the same view alone: the same distribution
    both = d[2 * n:]
    assert stats.ks_2samp((one.height * one.width).numpy(), (both.height * both.width).numpy()).pvalue > 1e-4


def test_blur_radius_range_is_a_parameter():
    d = ab.draw_views(20000, 28, 28, [(28, (0.4, 1.0), 1.0, 0.0)], gen(8), blur_radius=(0.05, 0.5))
    assert d.sigma.min() >= 0.05 and d.sigma.max() <= 0.5
    assert stats.kstest(d.sigma.numpy(), "uniform", args=(0.05, 0.45)).pvalue > 1e-4


def test_blur_beyond_the_papers_range_matches_pil(photo):
    """A radius above the default bound needs more taps: sigma_max provides them."""
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    ours = ab.pil_gaussian_blur(images, torch.tensor([3.0]), sigma_max=3.0)[0].permute(1, 2, 0).numpy() * 255
    pil = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(radius=3.0))).astype(np.float64)
    diff = np.abs(ours - pil)
    assert diff.max() <= 3.0 and diff.mean() <= 0.6, (diff.max(), diff.mean())  # as for sigma <= 2


def whole_image_aug(size: int = 8, locals_: int = 2) -> BatchMultiCrop:
    """Every crop is the whole image at its own size (identity resampling)."""
    return BatchMultiCrop((1.0, 1.0), (1.0, 1.0), locals_, global_size=size, local_size=size)


def test_solarisation_only_on_global_2_with_p_02(arrangement):
    n = 3000
    white = torch.full((n, 3, 8, 8), 255, dtype=torch.uint8)
    crops = whole_image_aug()(white, gen(9))
    # Before solarisation every pixel is >= 0.6 (brightness >= 0.6); solarised ones are <= 0.4.
    dark = [(denormalise(c).amax(dim=(1, 2, 3)) < 0.5) for c in crops]
    assert binomial_ok(int(dark[1].sum()), n, 0.2)
    assert not any(d.any() for i, d in enumerate(dark) if i != 1)


def test_blur_probability_per_view(arrangement):
    n = 2000
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 255
    images = board.to(torch.uint8).expand(n, 3, 8, 8).contiguous()

    def blurred(view: torch.Tensor) -> torch.Tensor:
        # Every step but the blur maps equal pixels to equal values; the blur does not (the board's
        # border pixels have a replicated neighbour of their own colour).
        red = denormalise(view)[:, 0].flatten(1)
        upper = red > red.mean(dim=1, keepdim=True)
        spread = torch.where(upper, red, -1.0).amax(1) - torch.where(upper, red, 2.0).amin(1)
        return spread > 1e-5

    crops = whole_image_aug()(images, gen(10))
    rates = [int(blurred(c).sum()) for c in crops]
    assert rates[0] == n  # global 1: p = 1.0
    assert binomial_ok(rates[1], n, 0.1)
    assert binomial_ok(rates[2], n, 0.5) and binomial_ok(rates[3], n, 0.5)


def test_flip_and_grayscale_probabilities():
    n = 3000
    ramp = torch.linspace(0, 255, 8).round().to(torch.uint8)
    images = torch.stack([ramp.expand(8, 8), ramp.flip(0).expand(8, 8), torch.full((8, 8), 90, dtype=torch.uint8)])
    images = images.expand(n, 3, 8, 8).contiguous()  # colourful, not left-right symmetric
    aug = whole_image_aug(locals_=1)
    crops = aug(images, gen(12))
    # The same draws again, rendered without the flip: each output is that or its mirror image.
    g = gen(12)
    draws = [ab.draw_views(n, 8, 8, [view], g) for view in aug.views]
    for view, d in zip(crops, draws):
        unflipped = ab.render_view(images, replace(d, flip=torch.zeros(n, dtype=torch.bool)), 8, "matmul",
                                   MEAN, STD)
        same = (view - unflipped).abs().amax((1, 2, 3)) < 1e-4
        mirrored = (view - unflipped.flip(-1)).abs().amax((1, 2, 3)) < 1e-4
        assert torch.equal(mirrored & ~same, d.flip & ~same) and bool((same | mirrored).all())
        assert binomial_ok(int(d.flip.sum()), n, 0.5)
        rgb = denormalise(view)
        gray = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-5) & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-5)
        assert torch.equal(gray, d.gray) and binomial_ok(int(gray.sum()), n, 0.2)


# ----------------------------------------------------------------------------------------------
# Inputs: grayscale, large images, both resampling paths
# ----------------------------------------------------------------------------------------------


def test_one_channel_input_is_three_equal_channels():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    aug = BatchMultiCrop((0.4, 1.0), (0.1, 0.4), 2, global_size=28, local_size=12)
    crops = aug(images, gen(13))
    repeated = aug(images.expand(-1, 3, -1, -1).contiguous(), gen(13))
    for one, three in zip(crops, repeated):
        rgb = denormalise(one)
        assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
        assert torch.allclose(one, three, atol=1e-5)


def test_matmul_and_interpolate_paths_agree(photo):
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].expand(6, -1, -1, -1).contiguous()
    results = {}
    for mode in ("matmul", "interpolate"):
        aug = BatchMultiCrop(local_crops_number=1, global_size=64, local_size=32, resample=mode)
        results[mode] = aug(images, gen(14))
    assert BatchMultiCrop().resample_mode(images) == "interpolate"
    assert BatchMultiCrop().resample_mode(images[..., :28, :28]) == "matmul"
    for a, b in zip(results["matmul"], results["interpolate"]):
        diff = (denormalise(a) - denormalise(b)).abs() * 255
        assert diff.mean() < 0.1 and diff.max() < 12


def test_grouped_rendering_equals_view_by_view(arrangement):
    """The GPU draws and renders views of one size as one batch: each view equals that view's
    draws rendered alone, and the stream is a function of the seed."""
    images = torch.randint(0, 256, (5, 3, 24, 20), dtype=torch.uint8)
    aug = BatchMultiCrop((0.3, 1.0), (0.1, 0.5), 3, global_size=16, local_size=8, resample="matmul")
    grouped = aug._render_grouped(images, gen(15), MEAN, STD)
    g = gen(15)
    for views, crops in ((aug.views[:2], grouped[:2]), (aug.views[2:], grouped[2:])):
        draws = ab.draw_views(5, 24, 20, views, g)
        for v, (crop, view) in enumerate(zip(crops, views)):
            alone = ab.render_view(images, draws[v * 5:(v + 1) * 5], view[0], "matmul", MEAN, STD)
            torch.testing.assert_close(crop, alone, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(grouped, aug._render_grouped(images, gen(15), MEAN, STD)))
    assert ab._same_device(torch.device("cpu"), images.device)


@pytest.mark.parametrize("channels, size", [(3, 80), (1, 28)])
def test_gpu_arrangement_never_makes_the_host_wait(monkeypatch, channels, size):
    """On a GPU the host must run ahead of the device: no value read back and no tensor made from
    Python numbers per batch (the CPU arrangement reads masks back, which the detector catches)."""
    images = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    aug = BatchMultiCrop(local_crops_number=2, global_size=72 if size > 64 else 16, local_size=8)
    with HostWaits() as cpu:
        aug(images, gen())
    assert cpu.calls
    monkeypatch.setattr(ab, "_on_cpu", lambda images: False)
    aug(images, gen())  # constants reach the device once
    with HostWaits() as gpu:
        aug(images, gen())
    assert gpu.calls == [], gpu.calls
