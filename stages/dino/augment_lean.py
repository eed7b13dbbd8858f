"""DINO multi-crop on a CPU core without the transform framework: the views of
`stages.dino.augment.MultiCrop`, drawn from the same distribution, in uint8 (issue 7).

`MultiCrop` composes torchvision transform modules as the reference does; per view that is a dozen
module calls, ~5 scalar `torch.rand` draws, a new PIL image per step and ToTensor + Normalize as two
float passes, and Pillow's kernels themselves (the HSV round trip of the hue jitter, the resize,
the blur) are most of its time. Here:

- one `torch.rand` call per image draws every random number of every view (`DRAWS_PER_VIEW` each,
  a fixed count whether or not a step applies), so torch's global RNG still seeds everything;
- `sample_view` turns a view's draws into its parameters with torchvision's formulas
  (RandomResizedCrop's 10 tries and central fallback, ColorJitter's random order and factor
  ranges);
- `render_view` applies them on uint8 arrays with `stages.dino._pillow_ops`, a C extension that
  reproduces Pillow's arithmetic for each operation the reference calls (crop + bicubic resize,
  flip, ImageEnhance's blends, the HSV hue shift, convert("L"), GaussianBlur) with faster loops:
  table lookups for the HSV round trip, both resize passes and the blur's box passes vectorised
  across lines; solarize is a comparison;
- each view comes out as uint8 (C, H, W); `normalize_views` does ToTensor + Normalize once per
  stacked batch, on whatever device the batch is on (4x less to move than float32).

Given the same view parameters a view equals torchvision's PIL functions' byte for byte
(tests/test_augment_lean.py; tests/test_pillow_ops.py checks each kernel against Pillow, the colour
operations on every RGB colour); the parameters are drawn from the same distributions, not the same
stream as `MultiCrop`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stages.dino.augment import (
    BLUR_RADIUS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    ImageInput,
    multicrop_views,
    to_rgb,
)
from stages.device import device_constant

#: RandomResizedCrop: tries before the central fallback, and the aspect-ratio range (3/4, 4/3).
CROP_TRIES = 10
RATIO = (3 / 4, 4 / 3)
#: ColorJitter(0.4, 0.4, 0.2, 0.1) as factor ranges, in torchvision's operation order
#: (0 brightness, 1 contrast, 2 saturation, 3 hue).
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
#: Uniforms per view: 4 per crop try (area, log-ratio, top, left), flip, jitter p, 4 for the jitter
#: order, 4 factors, grayscale, blur p, blur radius, solarize.
DRAWS_PER_VIEW = 4 * CROP_TRIES + 14


def pillow_ops():
    """The C extension stages.dino._pillow_ops, imported on first use so that modules importing
    this one (the pretrain stage) load where it was not built and never used (`augment: batch`)."""
    try:
        from stages.dino import _pillow_ops
    except ImportError as err:
        raise ImportError("the C extension stages.dino._pillow_ops is not built: `pip install -e .` (make venv) "
                          "compiles it, or `bash benchmarks/build_ext.sh` in a source tree") from err
    return _pillow_ops


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view, drawn.

    box: (left, top, right, bottom) of the crop in the source image; flip: mirror horizontally;
    jitter: ((operation, factor), ...) in application order, empty when ColorJitter is skipped;
    gray: convert to grayscale; blur_radius: GaussianBlur radius, None for no blur; solarize."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, float], ...]
    gray: bool
    blur_radius: float | None
    solarize: bool


def _crop_box(u: np.ndarray, width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params from 4 * CROP_TRIES uniforms."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for t in range(CROP_TRIES):
        u_area, u_ratio, u_top, u_left = u[4 * t: 4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def sample_view(u: np.ndarray, width: int, height: int, scale: tuple[float, float], blur_p: float,
                solarize_p: float, blur_radius: tuple[float, float] = BLUR_RADIUS) -> ViewParams:
    """A view's parameters from its DRAWS_PER_VIEW uniforms in [0, 1) (see the module docstring)."""
    box = _crop_box(u, width, height, scale)
    rest = u[4 * CROP_TRIES:]
    jitter: tuple[tuple[int, float], ...] = ()
    if rest[1] < JITTER_P:
        order = np.argsort(rest[2:6], kind="stable")  # argsort of iid uniforms: a uniform permutation
        factors = [lo + (hi - lo) * x for (lo, hi), x in zip(JITTER_RANGES, rest[6:10])]
        jitter = tuple((int(op), float(factors[op])) for op in order)
    blur = rest[11] < blur_p
    return ViewParams(
        box=box,
        flip=bool(rest[0] < FLIP_P),
        jitter=jitter,
        gray=bool(rest[10] < GRAY_P),
        blur_radius=float(blur_radius[0] + (blur_radius[1] - blur_radius[0]) * rest[12]) if blur else None,
        solarize=bool(rest[13] < solarize_p),
    )


def render_view(pixels: np.ndarray, view: ViewParams, size: int) -> np.ndarray:
    """One view of an RGB image, given and returned as C-contiguous (H, W, 3) uint8 arrays, equal
    byte for byte to what torchvision's PIL functions make from these parameters. Crop, resize,
    flip, ColorJitter, grayscale and blur run in `_pillow_ops` (Pillow's arithmetic in C, on arrays,
    without an image per operation); solarize is a comparison."""
    ops = pillow_ops()
    out = np.empty((size, size, 3), dtype=np.uint8)
    ops.resized_crop(pixels, pixels.shape[0], pixels.shape[1], view.box, out, size, view.flip)
    if view.jitter or view.gray:
        factors = dict(view.jitter)
        hue_shift = int(factors.get(3, 0.0) * 255) % 256  # torchvision: int(hue_factor * 255) as uint8
        ops.color_jitter(out, bytes(op for op, _ in view.jitter), factors.get(0, 1.0), factors.get(1, 1.0),
                         factors.get(2, 1.0), hue_shift, view.gray)
    if view.blur_radius is not None:
        ops.gaussian_blur(out, size, size, view.blur_radius)
    if view.solarize:  # ImageOps.solarize: values at or above the threshold are inverted
        out = np.where(out < SOLARIZE_THRESHOLD, out, 255 - out)
    return out


class LeanMultiCrop:
    """DINO multi-crop of one image as uint8 views; arguments, defaults, views and order as
    `MultiCrop`'s.

    Call: encoded image bytes or a PIL image → list of uint8 tensors [global 1 (3, G, G),
    global 2, local 1 (3, L, L), ...]; `normalize_views` makes them what `MultiCrop` returns.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_crops_number: int = 2,
        blur_radius: tuple[float, float] = BLUR_RADIUS,
    ) -> None:
        self.views = multicrop_views(global_crops_scale, local_crops_scale, local_crops_number, global_size,
                                     local_size, global_crops_number, owner="LeanMultiCrop")
        self.blur_radius = tuple(blur_radius)

    @property
    def ncrops(self) -> int:
        return len(self.views)

    def __call__(self, image: ImageInput) -> list[torch.Tensor]:
        pixels = np.asarray(to_rgb(image))
        height, width = pixels.shape[:2]
        draws = torch.rand(len(self.views), DRAWS_PER_VIEW, dtype=torch.float64).numpy()
        crops = []
        for (size, scale, blur_p, solarize_p), u in zip(self.views, draws):
            view = sample_view(u, width, height, scale, blur_p, solarize_p, self.blur_radius)
            crops.append(torch.from_numpy(render_view(pixels, view, size)).permute(2, 0, 1))
        return crops

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={self.views}, blur_radius={self.blur_radius})"


def _normalize(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize's arithmetic: divide by 255, subtract the mean, divide by the std."""
    return values.float().div_(255).sub_(mean).div_(std)


def normalize_views(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 views (B, 3, H, W) → float32, scaled to [0, 1] and ImageNet-normalised, as ToTensor +
    Normalize compute it. On the CPU through a table of that formula's 256 values per channel (one
    lookup per element instead of four passes; the same floats)."""
    if not views:
        return []
    device = views[0].device
    mean = device_constant(IMAGENET_MEAN, device).view(1, 3, 1, 1)
    std = device_constant(IMAGENET_STD, device).view(1, 3, 1, 1)
    if device.type != "cpu":
        return [_normalize(view, mean, std) for view in views]
    table = _normalize(torch.arange(256, dtype=torch.uint8).expand(1, 3, 256), mean.view(1, 3, 1), std.view(1, 3, 1))
    table = table.contiguous().numpy()
    out = []
    for view in views:
        source = view.contiguous()
        result = torch.empty(source.shape, dtype=torch.float32)
        pillow_ops().normalize_planes(source.numpy(), result.numpy(), table, source[0, 0].numel(), 3)
        out.append(result)
    return out
