"""DINO multi-crop augmentation on batches of image tensors, on any device.

The same views, in the same order, with the same distribution as `stages.dino.augment.MultiCrop`
(the reference's `DataAugmentationDINO`, paper Sec. 3.1 and Appendix), but every step works on
many images at once with per-sample random parameters, so the augmentation runs on the GPU beside
the training step (or batched on the CPU) instead of image by image in PIL:

    RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic) → horizontal flip (p 0.5) →
    ColorJitter(0.4, 0.4, 0.2, 0.1) in a random order per sample, p 0.8 → grayscale (p 0.2) →
    PIL's Gaussian blur, radius ~ U(0.1, 2.0) (p 1.0 global 1, 0.1 global 2, 0.5 locals) →
    solarise at 128/255 (p 0.2, global 2 only) → ImageNet mean/std normalisation.

How each step matches the reference:

- Crop boxes: torchvision's `RandomResizedCrop.get_params`, vectorised: 10 tries of (area,
  log-ratio) per sample, the first that fits is kept, else the central-crop fallback; top/left
  uniform over the positions where the box fits.
- Resampling: the antialiased bicubic filter of PIL's `Image.resize(..., BICUBIC)` (what the
  reference runs), which is also torch's `interpolate(..., mode="bicubic", antialias=True)` and so
  torchvision's `resized_crop` on tensors: Keys' cubic with a = -0.5, its support widened by the
  downscale factor, taps clipped at the crop border and renormalised; horizontal pass first, each
  pass rounded to 8 bits as PIL does. Two implementations of that one filter (`ResampleMode`):
  "matmul" builds each sample's crop-and-resize as a (size, W) and a (size, H) matrix and resamples
  the batch with two batched matrix products (GPU, and small images on CPU); "interpolate" calls
  torch's uint8 antialiased kernel once per crop (large images on CPU, where it is several times
  faster than dense products). `grid_sample` (bicubic) would be cheaper still but does not
  antialias: it aliases on the 1.3-4x downscales of ImageNet crops where PIL does not.
- Colour: torchvision.transforms.v2.functional's tensor kernels on float images in [0, 1]
  (`adjust_brightness`, `adjust_contrast` with the per-image mean of the grayscale image,
  `adjust_saturation`, `adjust_hue` through HSV), with per-sample factors, in a per-sample
  uniformly random order like ColorJitter's `fn_idx`: at each of the 4 positions every operation
  runs on the batch, with the neutral factor (1, or hue shift 0) for the samples whose permutation
  puts another operation there.
- Grayscale: ITU-R 601-2 luma (0.2989, 0.587, 0.114), copied to 3 channels.
- Gray sources (1 channel) stay one channel until the normalisation: on a gray pixel every
  ColorJitter operation is a per-sample affine map (hue the identity) and grayscale a scaling by
  the luma weights' sum, so the same views cost a third of the work and a fraction of the
  operations (`color_jitter_gray`).
- Blur: PIL's `ImageFilter.GaussianBlur(radius)` is not a sampled Gaussian but three passes of an
  extended box filter per axis (Gwosdek et al. 2011), edge pixels replicated; the same passes run
  here with a per-sample radius, as shifted adds, or for views up to 64 pixels a side as one
  per-sample matrix per axis (`blur_matrices`: few large kernels instead of many small ones).
- Solarisation: values >= 128/255 become 1 - value (PIL `ImageOps.solarize(img, 128)`).

Deviation from the reference: after the resampling, every step works in float32 instead of
rounding to 8 bits after each PIL operation (differences of a few 1/255 at most, on average
below 1/255).

Randomness: every draw comes from the `torch.Generator` passed in (on the images' device), in an
order fixed by the configuration, the batch size and the device type, so a batch is a pure
function of (images, generator state): seeding the generator reproduces it exactly, restoring its
state resumes it. (The CPU draws view by view, GPUs draw each group of same-size views at once.)

Speed: on the CPU the per-sample work runs in chunks of a few MB (cache-resident; 5x faster than
whole-batch passes), and probabilistic steps run only on the samples they apply to. On GPUs the
host's launches, not the arithmetic, bound a batch, so the work is arranged in few kernels: the
whole batch is one chunk, views of one size are drawn and rendered together, steps are selected
with `torch.where` (no host syncs), ColorJitter's three blends are one blend per position, and
the blur is two matrix products. Results do not depend on the chunking.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from stages.dino.augment import (
    BLUR_RADIUS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    ViewSpec,
    multicrop_views,
)
from stages.device import device_constant

logger = logging.getLogger(__name__)

ResampleMode = Literal["auto", "matmul", "interpolate"]

RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
LUMA = (0.2989, 0.587, 0.114)
#: The luma of a gray pixel x is LUMA_SUM * x (the weights sum to 0.9999, not 1).
LUMA_SUM = sum(LUMA)
BLUR_PASSES = 3
#: Keys' cubic convolution parameter of PIL's (and torch's antialiased) bicubic filter.
BICUBIC_A = -0.5
#: "auto" resampling on the CPU uses dense matrix products up to this many input pixels.
MATMUL_MAX_PIXELS_CPU = 64 * 64
#: Float elements per chunk of per-sample work on the CPU (2 MiB: stays in cache).
CPU_CHUNK_ELEMENTS = 1 << 19


# --------------------------------------------------------------------------------------------
# Crop boxes and resampling
# --------------------------------------------------------------------------------------------


def _on_cpu(images: torch.Tensor) -> bool:
    """Whether the work on `images` is arranged for the CPU (chunks, subsets, host reads) rather
    than for a GPU (whole batch, few kernels, no host syncs); see the module docstring's Speed.
    Tests patch it to run the GPU arrangement on the CPU."""
    return images.device.type == "cpu"


def _rand(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) draws of U(low, high) on the generator's device."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=dtype)
    return low + (high - low) * u


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float | torch.Tensor, float | torch.Tensor],
    generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop boxes of `RandomResizedCrop.get_params` for n images of one size, vectorised.

    Per sample: up to 10 tries of target area ~ U(scale) * H * W and aspect ratio
    exp(U(log ratio)); w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first try
    with 0 < w <= W and 0 < h <= H is kept and its top/left corner is uniform over the positions
    where it fits. If no try fits, the central crop of the image clipped to the ratio range.

    Args:
        n: number of boxes.
        height: image height H.
        width: image width W.
        scale: (min, max) area fraction: floats, or (n,) float64 tensors (one range per sample).
        generator: source of every draw (its device is where the boxes are made).
        ratio: (min, max) aspect ratio w / h.

    Returns:
        top, left, h, w: int64 tensors of shape (n,).
    """
    dev = generator.device
    f64 = torch.float64
    u_area = torch.rand(n, CROP_TRIES, generator=generator, device=dev, dtype=f64)
    u_ratio = torch.rand(n, CROP_TRIES, generator=generator, device=dev, dtype=f64)
    low, high = (s[:, None] if isinstance(s, torch.Tensor) else s for s in scale)
    target = float(height * width) * (low + (high - low) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round and Python's round both round half to even.
    w_try = torch.round(torch.sqrt(target * aspect))
    h_try = torch.round(torch.sqrt(target / aspect))
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    tries = torch.arange(CROP_TRIES, device=dev).expand(n, CROP_TRIES)
    first = torch.where(fits, tries, CROP_TRIES).amin(dim=1)
    found = first < CROP_TRIES
    pick = first.clamp_max(CROP_TRIES - 1)[:, None]
    w = w_try.gather(1, pick)[:, 0]
    h = h_try.gather(1, pick)[:, 0]

    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    w = torch.where(found, w, float(fb_w))
    h = torch.where(found, h, float(fb_h))

    u_top = torch.rand(n, generator=generator, device=dev, dtype=f64)
    u_left = torch.rand(n, generator=generator, device=dev, dtype=f64)
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fb_h) // 2))
    left = torch.where(found, left, float((width - fb_w) // 2))
    return top.long(), left.long(), h.long(), w.long()


def _cubic(x: torch.Tensor, a: float = BICUBIC_A) -> torch.Tensor:
    """Keys' cubic convolution kernel, support [-2, 2]."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_matrices(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    flip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample matrices of "crop [start, start + length) then antialiased bicubic resize".

    The weights of PIL's `ImagingResample` (and of torch's `interpolate(..., mode="bicubic",
    antialias=True, align_corners=False)`): output pixel o has centre c = s * (o + 0.5) in crop
    coordinates, s = length / out_size; crop pixel k gets weight cubic((k - c + 0.5) / max(s, 1))
    for k in [trunc(c - 2 max(s, 1) + 0.5), trunc(c + 2 max(s, 1) + 0.5)) clipped to the crop,
    and the weights are normalised to sum 1.

    Args:
        start: (n,) int64 first pixel of each crop along this axis.
        length: (n,) int64 crop length along this axis.
        in_size: image length along this axis.
        out_size: output length.
        flip: optional (n,) bool; where True the output order is reversed (horizontal flip).

    Returns:
        float32 (n, out_size, in_size); `M @ line` resamples one line of the image.
    """
    dev = start.device
    f32 = torch.float32
    length_f = length.to(f32)[:, None, None]
    scale = length_f / out_size
    widen = scale.clamp_min(1.0)
    support = 2.0 * widen
    center = scale * (torch.arange(out_size, device=dev, dtype=f32)[None, :, None] + 0.5)
    lo = torch.trunc(center - support + 0.5).clamp_min(0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length_f)
    k = torch.arange(in_size, device=dev, dtype=f32)[None, None, :] - start.to(f32)[:, None, None]
    taps = (k >= lo) & (k < hi)
    weights = torch.where(taps, _cubic((k - center + 0.5) / widen), torch.zeros((), device=dev))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights


def _to_8bit(values: torch.Tensor) -> torch.Tensor:
    """Round values on the 0..255 scale to integers in [0, 255], as PIL's 8-bit passes do."""
    return values.round_().clamp_(0.0, 255.0)


def resized_crop_matmul(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: int,
    flip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Crop and resize every image with batched matrix products (PIL's bicubic, 8-bit passes).

    Args:
        images: uint8 or float (B, C, H, W) with values 0..255.
        top, left, height, width: (V * B,) int64 crop boxes: V views of the B images, view-major
            (V = 1: one box per image). The images are broadcast, not copied, over the views.
        size: output side.
        flip: optional (V * B,) bool, horizontal flip of the output where True.

    Returns:
        float32 (V * B, C, size, size) in [0, 1], multiples of 1/255.
    """
    n, channels, img_h, img_w = images.shape
    views = top.shape[0] // n
    cols = resize_matrices(left, width, img_w, size, flip).transpose(-1, -2)  # (V*B, W, S)
    rows = resize_matrices(top, height, img_h, size)  # (V*B, S, H)
    cols = cols.reshape(views, n, 1, img_w, size)
    rows = rows.reshape(views, n, 1, size, img_h)
    # PIL resamples horizontally first and rounds each pass to 8 bits.
    out = _to_8bit(torch.matmul(images.to(torch.float32)[None], cols))  # (V, B, C, H, S)
    out = _to_8bit(torch.matmul(rows, out)).div_(255.0)
    return out.reshape(views * n, channels, size, size)


def resized_crop_interpolate(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: int,
    flip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Crop and resize image by image with torch's uint8 antialiased bicubic kernel.

    Same arguments and result as `resized_crop_matmul` (torch's uint8 kernel follows PIL's
    fixed-point passes); images must be uint8, fastest in channels-last layout.
    """
    boxes = torch.stack((top, left, height, width), dim=1).tolist()
    flips = flip.tolist() if flip is not None else [False] * len(boxes)
    out = torch.empty(images.shape[0], images.shape[1], size, size, device=images.device)
    for index, ((t, l, h, w), flipped) in enumerate(zip(boxes, flips)):
        crop = F.interpolate(images[index:index + 1, :, t:t + h, l:l + w], size=(size, size),
                             mode="bicubic", antialias=True, align_corners=False)
        out[index] = crop[0].flip(-1) if flipped else crop[0]
    return out.div_(255.0)


# --------------------------------------------------------------------------------------------
# Colour operations with per-sample factors (torchvision.transforms.v2.functional semantics)
# --------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, 1) for broadcasting against images."""
    return values.reshape(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of RGB images in [0, 1]: (B, 3, H, W) → (B, 1, H, W)."""
    r, g, b = images.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * images + (1 - ratio) * other, clamped to [0, 1]; ratio (B,).

    Written so that ratio 1 returns `images` exactly.
    """
    ratio = _per_sample(ratio)
    return (images * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness: (B, 3, H, W) in [0, 1] times factor (B,), clamped."""
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contrast: blend (B, 3, H, W) with the mean of its grayscale image, per image."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend (B, 3, H, W) with its grayscale image."""
    return _blend(images, rgb_to_grayscale(images), factor)


#: Offsets n of R, G, B in the HSV → RGB formula c = v - v s clamp(min(k, 4 - k), 0, 1),
#: k = (n + 6 h) mod 6 (the closed form of the six-sector table of PIL and torchvision).
_HSV_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue: rotate the HSV hue of (B, 3, H, W) in [0, 1] by shift (B,) turns, shift in [-0.5, 0.5].

    RGB → HSV as torchvision (hue in sixths: (g - b) / d where max = r, 2 + (b - r) / d where
    max = g, else 4 + (r - g) / d, d = max - min; 0 for gray pixels), hue + shift modulo 1, back to
    RGB with value and chroma kept.
    """
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    sixths = torch.where(
        maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    sixths = torch.remainder(sixths + 6.0 * shift.reshape(-1, 1, 1), 6.0).unsqueeze(1)
    offsets = device_constant(_HSV_CHANNEL_OFFSETS, images.device).reshape(1, 3, 1, 1)
    k = torch.remainder(sixths + offsets, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


#: The ColorJitter operations in torchvision's fn_idx numbering.
COLOUR_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue,
)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors and order.

    Args:
        images: float (B, 3, H, W) in [0, 1].
        factors: (B, 4) brightness, contrast, saturation factors and hue shift.
        order: (B, 4) int64, a permutation of 0..3 per sample (0 brightness, 1 contrast,
            2 saturation, 3 hue), applied left to right.

    Returns:
        float (B, 3, H, W) in [0, 1].
    """
    if not _on_cpu(images):
        return _color_jitter_selected(images, factors, order)
    out = images.clone()  # the CPU path of _apply_where writes in place
    for position in range(4):
        here = order[:, position]
        for op_index, op in enumerate(COLOUR_OPS):
            out = _apply_where(here == op_index, op, out, factors[:, op_index])
    return out


def _color_jitter_selected(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`color_jitter` on the whole batch without host synchronisation (GPUs), in a fraction of
    the operations of running all four operations at each position and selecting.

    Brightness, contrast and saturation are all the blend clamp(f x + (1 - f) y) with y = 0, the
    mean luma, or the luma, so each position is one blend with per-sample f and y (bit for bit the
    operation's own arithmetic), and hue where the permutation puts it there.
    """
    out = images
    for position in range(4):
        op = order[:, position]
        is_contrast, is_saturation, is_hue = (_per_sample(op == index) for index in (1, 2, 3))
        gray = rgb_to_grayscale(out)
        other = torch.where(is_contrast, gray.mean(dim=(1, 2, 3), keepdim=True),
                            torch.where(is_saturation, gray, 0.0))
        factor = factors.gather(1, op.clamp_max(2)[:, None])
        out = torch.where(is_hue, adjust_hue(out, factors[:, 3]), _blend(out, other, factor))
    return out


def color_jitter_gray(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                      jitter: torch.Tensor) -> torch.Tensor:
    """`color_jitter` of gray images kept as one channel, for the samples where jitter is True.

    On a gray pixel x (R = G = B) every ColorJitter operation is a per-sample affine map clamped
    to [0, 1]: brightness f x; contrast f x + (1 - f) LUMA_SUM mean(x); saturation, the blend
    with the luma LUMA_SUM x, (f + (1 - f) LUMA_SUM) x; hue the identity (zero chroma). So each
    of the 4 positions is one a x + b over the batch (a = 1, b = 0 where the sample is not
    jittered or its permutation puts hue there), not 4 masked operations.

    Args:
        images: float (B, 1, H, W) in [0, 1].
        factors, order: as in `color_jitter`.
        jitter: (B,) bool, ColorJitter applied.

    Returns:
        float (B, 1, H, W) in [0, 1]; equal to `color_jitter` of the 3-channel image up to
        float rounding.
    """
    brightness, contrast, saturation = factors[:, 0], factors[:, 1], factors[:, 2]
    saturation_scale = saturation + (1.0 - saturation) * LUMA_SUM
    out = images
    for position in range(4):
        op = torch.where(jitter, order[:, position], 3)
        scale = torch.where(op == 0, brightness, torch.where(
            op == 1, contrast, torch.where(op == 2, saturation_scale, 1.0)))
        mean = out.mean(dim=(1, 2, 3)) * LUMA_SUM
        shift = torch.where(op == 1, (1.0 - contrast) * mean, 0.0)
        out = (out * _per_sample(scale)).add_(_per_sample(shift)).clamp_(0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Blur and solarisation
# --------------------------------------------------------------------------------------------


def pil_box_radius(sigma: torch.Tensor, passes: int = BLUR_PASSES) -> torch.Tensor:
    """Extended-box radius of PIL's GaussianBlur(radius=sigma) for `passes` passes.

    Gwosdek et al. 2011, eqs. (7), (11), (14), as PIL's `_gaussian_blur_radius`: each pass has
    variance sigma² / passes.
    """
    var = sigma * sigma / passes
    box = torch.sqrt(12.0 * var + 1.0)
    whole = torch.floor((box - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    return whole + frac


@lru_cache(maxsize=None)
def _max_box_reach(sigma_max: float, passes: int = BLUR_PASSES) -> int:
    """Largest tap offset of one extended-box pass for sigmas up to sigma_max."""
    radius = float(pil_box_radius(torch.tensor(sigma_max, dtype=torch.float64), passes))
    return int(math.floor(radius)) + 1


#: On the CPU, images up to this side are blurred with per-sample matrices (few, large kernels),
#: larger ones with shifted adds (a matrix costs side³ per channel). GPUs always take the matrices:
#: there the ~70 small kernels of the shifted adds cost the host more than the products cost the GPU.
BLUR_MATMUL_MAX_SIDE = 64


def _box_taps(sigma: torch.Tensor, reach: int, passes: int) -> torch.Tensor:
    """(B, reach + 1) weights of one extended-box pass at offsets 0..reach (symmetric)."""
    radius = pil_box_radius(sigma.to(torch.float32), passes)[:, None]
    whole = torch.floor(radius)
    inner = 1.0 / (2.0 * radius + 1.0)
    offsets = torch.arange(reach + 1, device=sigma.device, dtype=torch.float32)
    return torch.where(offsets <= whole, inner,
                       torch.where(offsets == whole + 1, (radius - whole) * inner, 0.0))


def blur_matrices(sigma: torch.Tensor, length: int, sigma_max: float = BLUR_RADIUS[1],
                  passes: int = BLUR_PASSES) -> torch.Tensor:
    """(B, length, length) matrices of `passes` extended-box passes along one axis of a line.

    Row i of one pass holds the tap of offset k at column clamp(i + k, 0, length - 1) (edge
    pixels replicated, added up where several offsets clamp to the edge); the passes compose
    as the matrix power.
    """
    reach = _max_box_reach(sigma_max, passes)
    taps = _box_taps(sigma, reach, passes)
    offsets = torch.arange(-reach, reach + 1, device=sigma.device)
    columns = (torch.arange(length, device=sigma.device)[:, None] + offsets).clamp_(0, length - 1)
    n = sigma.shape[0]
    weights = taps[:, offsets.abs()][:, None, :].expand(n, length, -1)
    one_pass = torch.zeros(n, length, length, device=sigma.device).scatter_add_(
        2, columns.expand(n, -1, -1), weights)
    return torch.linalg.matrix_power(one_pass, passes)


def pil_gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, sigma_max: float = BLUR_RADIUS[1],
                      passes: int = BLUR_PASSES) -> torch.Tensor:
    """PIL's `ImageFilter.GaussianBlur(radius=sigma)` with a per-sample sigma, in float.

    PIL runs `passes` extended-box passes along x, then along y: each output pixel is
    ww * (sum of the 2r + 1 nearest inputs) + fw * (the next one on each side), ww = 1 / (2R + 1),
    fw = (R - r) / (2R + 1), r = floor(R), R from `pil_box_radius`; edge pixels are replicated.
    Small images and GPUs run the passes as per-sample matrices (`blur_matrices`), large images on
    the CPU as shifted adds; both give the same result up to float rounding.

    Args:
        images: float (B, C, H, W).
        sigma: (B,) radius (standard deviation) per sample, <= sigma_max.
        sigma_max: bound on sigma, fixes the number of taps.
        passes: box passes per axis (PIL: 3).

    Returns:
        float (B, C, H, W).
    """
    height, width = images.shape[-2:]
    if max(height, width) <= BLUR_MATMUL_MAX_SIDE or not _on_cpu(images):
        rows = blur_matrices(sigma, height, sigma_max, passes)[:, None]
        cols = rows if width == height else blur_matrices(sigma, width, sigma_max, passes)[:, None]
        return torch.matmul(torch.matmul(rows, images), cols.transpose(-1, -2))
    return _blur_shifted_adds(images, sigma, sigma_max, passes)


def _blur_shifted_adds(images: torch.Tensor, sigma: torch.Tensor, sigma_max: float,
                       passes: int) -> torch.Tensor:
    """`pil_gaussian_blur` pass by pass with shifted adds (several times faster than a grouped
    convolution with per-sample 1-D kernels)."""
    reach = _max_box_reach(sigma_max, passes)
    # The taps are symmetric: weight k multiplies the pixels at offsets -k and +k.
    taps = _box_taps(sigma, reach, passes)
    weights = [_per_sample(taps[:, k]) for k in range(reach + 1)]
    out = images
    for dim, pad in ((-1, (reach, reach, 0, 0)), (-2, (0, 0, reach, reach))):
        length = out.shape[dim]
        for _ in range(passes):
            padded = F.pad(out, pad, mode="replicate")
            out = padded.narrow(dim, reach, length) * weights[0]
            for k in range(1, reach + 1):
                pair = padded.narrow(dim, reach - k, length) + padded.narrow(dim, reach + k, length)
                out.addcmul_(pair, weights[k])
    return out


def solarize(images: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD / 255.0) -> torch.Tensor:
    """Invert every value >= threshold: (B, C, H, W) in [0, 1]."""
    return torch.where(images >= threshold, 1.0 - images, images)


# --------------------------------------------------------------------------------------------
# The views
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewDraws:
    """Every random draw of one view, per sample (all tensors (B,) unless noted).

    Attributes:
        top, left, height, width: int64 crop boxes.
        flip: bool, horizontal flip.
        jitter: bool, ColorJitter applied.
        order: (B, 4) int64, the ColorJitter order (a permutation of 0..3).
        factors: (B, 4) brightness, contrast, saturation factors, hue shift.
        gray: bool, grayscale.
        blur: bool, blurred.
        sigma: blur radius.
        solarize: bool, solarised; None for views without solarisation.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: Optional[torch.Tensor]

    def __getitem__(self, index: slice) -> "ViewDraws":
        values = (getattr(self, f.name) for f in fields(self))
        return ViewDraws(*(None if v is None else v[index] for v in values))


def draw_views(n: int, height: int, width: int, views: Sequence[ViewSpec], generator: torch.Generator,
               blur_radius: tuple[float, float] = BLUR_RADIUS) -> ViewDraws:
    """Draw the random parameters of V views for n images of size height x width, view-major
    (sample i of view v at v * n + i).

    The draw order is fixed (crop, flip, jitter, order, 4 factors, grayscale, blur, sigma,
    solarisation when a view solarises); each is one draw for all V * n samples, so views drawn
    together cost the host as much as one view.
    """
    total = n * len(views)

    def per_view(values: list[float], dtype: torch.dtype) -> float | torch.Tensor:
        """A float when the views share it, else (V * n,) in the dtype the float would be used in
        (a Python float meets a tensor in the tensor's dtype), so one view draws as before."""
        if len(set(values)) == 1:
            return values[0]
        return device_constant(tuple(values), generator.device, dtype).repeat_interleave(n)

    scale = tuple(per_view([v[1][end] for v in views], torch.float64) for end in (0, 1))
    blur_p = per_view([v[2] for v in views], torch.float32)
    solarize_p = [v[3] for v in views]
    top, left, crop_h, crop_w = sample_crop_boxes(total, height, width, scale, generator)
    flip = _rand(total, generator) < FLIP_P
    jitter = _rand(total, generator) < JITTER_P
    order = torch.rand(total, 4, generator=generator, device=generator.device).argsort(dim=1)
    factors = torch.stack([
        _rand(total, generator, 1 - BRIGHTNESS, 1 + BRIGHTNESS),
        _rand(total, generator, 1 - CONTRAST, 1 + CONTRAST),
        _rand(total, generator, 1 - SATURATION, 1 + SATURATION),
        _rand(total, generator, -HUE, HUE),
    ], dim=1)
    gray = _rand(total, generator) < GRAYSCALE_P
    blur = _rand(total, generator) < blur_p
    sigma = _rand(total, generator, blur_radius[0], blur_radius[1])
    solar = _rand(total, generator) < per_view(solarize_p, torch.float32) if any(solarize_p) else None
    return ViewDraws(top, left, crop_h, crop_w, flip, jitter, order, factors, gray, blur, sigma,
                     solar)


def _apply_where(mask: torch.Tensor, fn: Callable[..., torch.Tensor], images: torch.Tensor,
                 *per_sample: torch.Tensor) -> torch.Tensor:
    """fn(images, *per_sample) on the samples where mask is True, the others unchanged.

    On the CPU only the selected samples are computed and written into `images` in place (the
    callers own it); elsewhere the whole batch is computed and selected with torch.where (no host
    synchronisation). fn must work sample by sample.
    """
    if _on_cpu(images):
        if bool(mask.all()):
            return fn(images, *per_sample)
        index = mask.nonzero()[:, 0]
        if index.numel() == 0:
            return images
        images[index] = fn(images[index], *(p[index] for p in per_sample))
        return images
    return torch.where(_per_sample(mask), fn(images, *per_sample), images)


def render_view(source: torch.Tensor, draws: ViewDraws, size: int, resample: ResampleMode,
                mean: torch.Tensor, std: torch.Tensor, blur_max: float = BLUR_RADIUS[1]) -> torch.Tensor:
    """Apply one view's draws to a batch (the one definition of a view).

    Args:
        source: (B, C, H, W) uint8 images, C = 1 or 3 (channels-last helps "interpolate").
        draws: the view's draws for these B images.
        size: output side.
        resample: "matmul" or "interpolate" (see the module docstring).
        mean, std: (1, 3, 1, 1) normalisation constants.
        blur_max: upper bound of draws.sigma (fixes the blur's taps).

    Returns:
        float32 (B, 3, size, size), normalised.
    """
    crop = resized_crop_matmul if resample == "matmul" else resized_crop_interpolate
    view = crop(source, draws.top, draws.left, draws.height, draws.width, size, draws.flip)
    if view.shape[1] == 1:
        # Gray stays one channel until the normalisation (the same result, see color_jitter_gray).
        view = color_jitter_gray(view, draws.factors, draws.order, draws.jitter)
        view = view * _per_sample(torch.where(draws.gray, LUMA_SUM, 1.0))
    else:
        view = _apply_where(draws.jitter, color_jitter, view, draws.factors, draws.order)
        view = _apply_where(draws.gray, lambda x: rgb_to_grayscale(x).expand(-1, 3, -1, -1), view)
    view = _apply_where(draws.blur, lambda x, sigma: pil_gaussian_blur(x, sigma, blur_max), view, draws.sigma)
    if draws.solarize is not None:
        view = _apply_where(draws.solarize, solarize, view)
    return (view - mean) / std


class BatchMultiCrop:
    """DINO multi-crop of a batch of uint8 image tensors: 2 global and n local views per image.

    Same arguments, defaults, views and order as `stages.dino.augment.MultiCrop` (reference
    main_dino.py: global scale (0.4, 1), local scale (0.05, 0.4), 8 local crops, 224 and 96
    pixels); see the module docstring for how each step matches the reference.

    Args:
        global_crops_scale: RandomResizedCrop area range of the global views.
        local_crops_scale: RandomResizedCrop area range of the local views.
        local_crops_number: number of local views (0 allowed).
        global_size: side of the global views.
        local_size: side of the local views.
        global_crops_number: 2 (DINO) or 1 (then only "global 1": blur p 1.0, no solarisation).
        resample: "auto" (dense matrix products on GPUs and for images up to 64x64 pixels on the
            CPU, else torch's uint8 kernel crop by crop), "matmul" or "interpolate".
        blur_radius: range of the Gaussian blur radius in pixels (paper: (0.1, 2.0) on 224² views).

    Call: `aug(images, generator)` with images uint8 (B, C, H, W), C = 1 (copied to 3 channels)
    or 3, all the same size, and a torch.Generator on the images' device that makes every draw.
    Returns float32 tensors [global 1 (B, 3, G, G), global 2 (B, 3, G, G), local 1 (B, 3, L, L),
    ..., local n] on the images' device, ImageNet-normalised.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_crops_number: int = 2,
        resample: ResampleMode = "auto",
        blur_radius: tuple[float, float] = BLUR_RADIUS,
    ) -> None:
        #: (size, scale, blur p, solarise p) of every view, in output order.
        self.views: list[ViewSpec] = multicrop_views(global_crops_scale, local_crops_scale, local_crops_number,
                                                     global_size, local_size, global_crops_number,
                                                     owner="BatchMultiCrop")
        if global_size < 1 or local_size < 1:
            raise ValueError(f"BatchMultiCrop: global_size and local_size must be >= 1, "
                             f"got {global_size}, {local_size}")
        if resample not in ("auto", "matmul", "interpolate"):
            raise ValueError(f"BatchMultiCrop: resample must be 'auto', 'matmul' or 'interpolate', "
                             f"got {resample!r}")
        self.resample = resample
        self.blur_radius = tuple(blur_radius)

    @property
    def ncrops(self) -> int:
        """Number of views returned per image."""
        return len(self.views)

    def resample_mode(self, images: torch.Tensor) -> Literal["matmul", "interpolate"]:
        """The resampling implementation used for these images."""
        if self.resample != "auto":
            return self.resample
        small = images.shape[-2] * images.shape[-1] <= MATMUL_MAX_PIXELS_CPU
        return "matmul" if not _on_cpu(images) or small else "interpolate"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                   if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"BatchMultiCrop: expected a uint8 tensor (B, C, H, W), got {got}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"BatchMultiCrop: expected 1 or 3 channels, got {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        if not _same_device(torch.device(generator.device), images.device):
            raise ValueError(f"BatchMultiCrop: the generator is on {generator.device} but the images "
                             f"are on {images.device}; they must be on the same device")
        n, _, height, width = images.shape
        resample = self.resample_mode(images)
        if resample == "interpolate":
            images = images.contiguous(memory_format=torch.channels_last)
        mean = device_constant(IMAGENET_MEAN, images.device).reshape(1, 3, 1, 1)
        std = device_constant(IMAGENET_STD, images.device).reshape(1, 3, 1, 1)
        if not _on_cpu(images) and resample == "matmul":
            return self._render_grouped(images, generator, mean, std)
        # All draws first, view by view: the stream does not depend on the chunking below.
        draws = [draw_views(n, height, width, [view], generator, self.blur_radius) for view in self.views]
        crops = []
        for (size, _, _, _), view_draws in zip(self.views, draws):
            if _on_cpu(images):
                chunk = max(1, CPU_CHUNK_ELEMENTS // (3 * size * size))
            else:
                chunk = n
            out = torch.empty(n, 3, size, size, device=images.device)
            for start in range(0, n, chunk):
                part = slice(start, min(n, start + chunk))
                out[part] = render_view(images[part], view_draws[part], size, resample, mean, std,
                                        self.blur_radius[1])
            crops.append(out)
        return crops

    def _render_grouped(self, images: torch.Tensor, generator: torch.Generator, mean: torch.Tensor,
                        std: torch.Tensor) -> list[torch.Tensor]:
        """Draw and render consecutive views of one size as one batch (GPUs: every kernel launched
        once per group of views instead of once per view); the same distribution as view by view,
        from a different stream of draws."""
        n, _, height, width = images.shape
        crops: list[torch.Tensor] = []
        start = 0
        while start < len(self.views):
            size = self.views[start][0]
            stop = start
            while stop < len(self.views) and self.views[stop][0] == size:
                stop += 1
            draws = draw_views(n, height, width, self.views[start:stop], generator, self.blur_radius)
            out = render_view(images, draws, size, "matmul", mean, std, self.blur_radius[1])
            crops.extend(out.split(n))
            start = stop
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(views={self.views}, resample={self.resample!r}, "
                f"blur_radius={self.blur_radius})")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type and index ("cuda" without an index is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index is None or b.index is None or a.index == b.index
