"""Multi-crop augmentation of DINO (paper Sec. 3.1 and Appendix; reference `DataAugmentationDINO`)
and the evaluation transform of the frozen-feature stages (reference eval_knn.py / eval_linear.py).

Every view is the same pipeline, built by one function from four numbers (size, scale range, blur
probability, solarisation probability):

    RandomResizedCrop(size, scale, bicubic) → horizontal flip (p 0.5) → ColorJitter(0.4, 0.4, 0.2,
    0.1) with p 0.8 → grayscale (p 0.2) → Gaussian blur, radius ~ U(0.1, 2.0), PIL's filter
    (p 1.0 global 1, 0.1 global 2, 0.5 locals) → solarise at 128 (p 0.2 global 2 only) → ToTensor →
    ImageNet mean/std normalisation.

`MultiCrop` composes torchvision's transform modules exactly as the reference does; the pretrain
stage's `augment: pil` runs `stages.dino.augment_lean.LeanMultiCrop`, the same operations and
distribution driven without them (faster, uint8 out), and benchmarks compare the two.

Randomness: every random draw, blur and solarisation included, comes from torch's global RNG
(torchvision's transforms draw from it too; the reference draws blur and solarisation from Python's
`random`). Seeding torch alone (`torch.manual_seed`, or the per-worker seed a DataLoader sets)
therefore reproduces the crops exactly.
"""

from __future__ import annotations

import io
import logging
from typing import Callable, Union

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_RADIUS = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
#: Blur / solarisation probability of each view kind (reference DataAugmentationDINO).
GLOBAL1_BLUR, GLOBAL2_BLUR, LOCAL_BLUR = 1.0, 0.1, 0.5
GLOBAL2_SOLARIZE = 0.2

ImageInput = Union[bytes, bytearray, memoryview, Image.Image]
#: One view of a multi-crop: (side in pixels, RandomResizedCrop area range, blur p, solarisation p).
ViewSpec = tuple[int, tuple[float, float], float, float]


def _uniform(low: float, high: float) -> float:
    """One draw of U(low, high) from torch's global RNG."""
    return low + (high - low) * torch.rand(()).item()


class RandomGaussianBlur:
    """With probability p, PIL Gaussian blur with a radius drawn uniformly in [radius_min, radius_max].

    Args:
        p: probability of blurring.
        radius_min: smallest radius (pixels).
        radius_max: largest radius (pixels).
    """

    def __init__(self, p: float, radius_min: float = BLUR_RADIUS[0], radius_max: float = BLUR_RADIUS[1]):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=_uniform(self.radius_min, self.radius_max)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarize:
    """With probability p, invert every pixel value >= threshold (PIL `ImageOps.solarize`).

    Args:
        p: probability of solarising.
        threshold: pixel values at or above it are inverted.
    """

    def __init__(self, p: float, threshold: int = SOLARIZE_THRESHOLD):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        return ImageOps.solarize(img, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


def normalize() -> transforms.Compose:
    """PIL image (H, W, 3) uint8 → float32 tensor (3, H, W), ImageNet mean/std normalised."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def view_transform(
    size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0,
    blur_radius: tuple[float, float] = BLUR_RADIUS,
) -> transforms.Compose:
    """The one definition of a DINO view; the three kinds differ only in these arguments.

    Args:
        size: output side in pixels.
        scale: RandomResizedCrop area range (fraction of the image).
        blur_p: probability of the Gaussian blur.
        solarize_p: probability of solarisation (0 leaves the step out).
        blur_radius: range of the blur radius in pixels (paper: (0.1, 2.0) on 224² views).

    Returns:
        PIL RGB image → float32 tensor (3, size, size).
    """
    steps: list[Callable] = [
        transforms.RandomResizedCrop(
            size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply(
            [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
        ),
        transforms.RandomGrayscale(p=0.2),
        RandomGaussianBlur(blur_p, *blur_radius),
    ]
    if solarize_p > 0:
        steps.append(RandomSolarize(solarize_p))
    steps.append(normalize())
    return transforms.Compose(steps)


def to_rgb(image: ImageInput) -> Image.Image:
    """Decode encoded bytes (PNG, JPEG, ...) or take a PIL image; return it in RGB mode.

    Grayscale (L), palette, RGBA and other modes are converted, so every output has 3 channels.

    Raises:
        ValueError: the bytes are not a decodable image, or the input type is not supported.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as img:
                return img.convert("RGB")
        except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise ValueError(f"cannot decode image ({len(image)} bytes): {exc}") from exc
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    raise ValueError(f"expected encoded image bytes or a PIL image, got {type(image).__name__}")


def multicrop_views(
    global_crops_scale: tuple[float, float],
    local_crops_scale: tuple[float, float],
    local_crops_number: int,
    global_size: int,
    local_size: int,
    global_crops_number: int = 2,
    owner: str = "MultiCrop",
) -> list[ViewSpec]:
    """The views of a DINO multi-crop, checked: what `MultiCrop` (PIL) and
    `stages.dino.augment_batch.BatchMultiCrop` (tensors) both render.

    Args: as `MultiCrop`'s; `owner` names the caller in the errors.

    Returns:
        The views in output order [global 1, global 2, local 1, ..., local n]: global 1 blurred
        with p 1.0, global 2 with p 0.1 and solarised with p 0.2, locals blurred with p 0.5
        (reference DataAugmentationDINO).

    Raises:
        ValueError: global_crops_number not 1 or 2, a negative local_crops_number, or a scale that
            is not (min, max) with 0 < min <= max <= 1.
    """
    if global_crops_number not in (1, 2):
        raise ValueError(f"{owner}: global_crops_number must be 1 or 2, got {global_crops_number}")
    if local_crops_number < 0:
        raise ValueError(f"{owner}: local_crops_number must be >= 0, got {local_crops_number}")
    for name, (lo, hi) in (("global_crops_scale", global_crops_scale),
                           ("local_crops_scale", local_crops_scale)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{owner}: {name} must be (min, max) with 0 < min <= max <= 1, "
                             f"got {tuple((lo, hi))}")
    global_views = [(GLOBAL1_BLUR, 0.0), (GLOBAL2_BLUR, GLOBAL2_SOLARIZE)][:global_crops_number]
    views: list[ViewSpec] = [(global_size, tuple(global_crops_scale), blur, sol) for blur, sol in global_views]
    return views + [(local_size, tuple(local_crops_scale), LOCAL_BLUR, 0.0)] * local_crops_number


class MultiCrop:
    """DINO multi-crop: 2 global views and `local_crops_number` local views of one image.

    Defaults as the reference (main_dino.py: global scale (0.4, 1), local scale (0.05, 0.4), 8 local
    crops, 224 and 96 pixels).

    Args:
        global_crops_scale: RandomResizedCrop area range of the global views.
        local_crops_scale: RandomResizedCrop area range of the local views.
        local_crops_number: number of local views (0 allowed).
        global_size: side of the global views.
        local_size: side of the local views.
        global_crops_number: 2 (DINO) or 1 (then only "global 1", blur p 1.0, no solarisation).
        blur_radius: range of the Gaussian blur radius in pixels; the paper's (0.1, 2.0) is for
            224² views (scale it with the image for small ones).

    Call: encoded image bytes or a PIL image → list of float32 tensors
    [global 1 (3, G, G), global 2 (3, G, G), local 1 (3, L, L), ..., local n].

    Attributes:
        global_transforms: the per-view pipelines of the global views (global 1 first).
        local_transform: the pipeline of every local view.
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
        views = multicrop_views(global_crops_scale, local_crops_scale, local_crops_number, global_size,
                                local_size, global_crops_number, owner="MultiCrop")
        self.global_transforms = [view_transform(*view, blur_radius=blur_radius)
                                  for view in views[:global_crops_number]]
        self.local_transform = view_transform(local_size, local_crops_scale, LOCAL_BLUR, blur_radius=blur_radius)
        self.local_crops_number = local_crops_number

    @property
    def ncrops(self) -> int:
        """Number of views returned per image."""
        return len(self.global_transforms) + self.local_crops_number

    def __call__(self, image: ImageInput) -> list[torch.Tensor]:
        img = to_rgb(image)
        crops = [t(img) for t in self.global_transforms]
        crops.extend(self.local_transform(img) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global={self.global_transforms}, "
                f"local={self.local_crops_number}x{self.local_transform})")


class EvalTransform:
    """Deterministic evaluation view (reference eval_knn.py): bicubic resize of the shorter side to
    `resize`, center crop `crop_size`, ToTensor, ImageNet normalisation; grayscale → 3 channels.

    Args:
        resize: target length of the shorter side.
        crop_size: side of the square center crop.

    Call: encoded image bytes or a PIL image → float32 tensor (3, crop_size, crop_size).
    """

    def __init__(self, resize: int = 256, crop_size: int = 224) -> None:
        if resize < 1 or crop_size < 1:
            raise ValueError(f"EvalTransform: resize and crop_size must be >= 1, got {resize}, {crop_size}")
        self.transform = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop_size),
            normalize(),
        ])

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def eval_transform(resize: int = 256, crop_size: int = 224) -> EvalTransform:
    """The evaluation transform of the feature-extraction stage (see EvalTransform)."""
    return EvalTransform(resize, crop_size)
