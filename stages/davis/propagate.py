"""Semi-supervised video object segmentation by label propagation on frozen patch features.

The method of the DINO paper's DAVIS-2017 evaluation (Caron et al. 2021, Sec. 4.2.2 / Table 5;
the reference's eval_video_segmentation.py, itself after Jabri et al.'s / UVC's protocol):

1. Every frame is resized so that its shorter side is `short_side` (480) and its longer side is
   `short_side × aspect` rounded down to a multiple of `long_side_multiple` (64); both must be
   multiples of the patch size p. Its features are the last block's patch tokens (through the
   final norm, the [CLS] token dropped) on the (h, w) = (H/p, W/p) patch grid, L2-normalised.
2. The first frame's annotation, resized to (w, h) with nearest-neighbour sampling (PIL), is
   one-hot encoded: (C, h, w) soft labels, C = 1 + the number of objects.
3. For frame t the context is the first frame (its ground truth) and the `n_last_frames` previous
   frames (their *propagated soft labels*, not argmaxed). The affinity of target patch i and
   context patch j is exp(cos(f_i, f_j) / temperature), set to 0 unless j lies within
   ±`size_mask_neighborhood` rows and columns of i; each target keeps its `topk` strongest
   sources over all context frames together (ties with the k-th value are kept, as the
   reference's `aff < min(topk)` test), normalised to sum 1; its soft label is the weighted sum of
   the sources' soft labels.
4. The soft labels are upsampled by p (bilinear, align_corners False), each channel min-max
   normalised when its maximum is positive (the reference's `norm_mask`), argmaxed (first index on
   ties), and the id map is resized to the original frame size with nearest-neighbour sampling.

Deviations from the reference, none of which changes a DAVIS result: frames are resized with
torch's bilinear interpolation on [0, 1] floats (the reference: OpenCV INTER_LINEAR on uint8),
void pixels (255) of the first annotation count as background (the reference would make them
channel 255), C comes from the full-size annotation (the reference: from its downsampled copy;
an object lost in downsampling gets an all-zero channel here, which never wins the argmax), and
the affinity is computed in bands of target rows against the context rows within reach of the
window, never as the reference's dense (h·w)² mask, so ViT-S/8 fits on small GPUs and CPUs.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stages.davis.palette import VOID_ID

logger = logging.getLogger(__name__)

#: The reference's frame normalisation (eval_video_segmentation.color_normalize). Its red std,
#: 0.228, differs from ImageNet's 0.229; kept so that reference checkpoints see the same inputs.
FRAME_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
FRAME_STD: tuple[float, float, float] = (0.228, 0.224, 0.225)
#: Affinity entries (targets × sources) computed at once, bounding memory.
AFFINITY_BUDGET = 1 << 24


@dataclass(frozen=True)
class PropagationSettings:
    """Label-propagation hyperparameters (defaults as the reference's eval_video_segmentation.py).

    Attributes:
        n_last_frames: previous frames in the context (besides the first frame).
        size_mask_neighborhood: source window radius in patches; 0 disables the restriction.
        topk: sources kept per target patch.
        temperature: affinity exp(cos / temperature).
        short_side: resized length of the frame's shorter side.
        long_side_multiple: the longer side is rounded down to a multiple of this.
    """

    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    topk: int = 5
    temperature: float = 0.1
    short_side: int = 480
    long_side_multiple: int = 64

    @classmethod
    def from_params(cls, davis) -> "PropagationSettings":
        """From the validated `davis` section of params.yaml (`stages.params.Davis`)."""
        return cls(
            n_last_frames=davis.n_last_frames,
            size_mask_neighborhood=davis.size_mask_neighborhood,
            topk=davis.topk,
            temperature=davis.temperature,
            short_side=davis.short_side,
            long_side_multiple=davis.long_side_multiple,
        )


def resized_frame_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """The reference's frame size: shorter side `short_side`, longer side floored to `multiple`.

    As read_frame with scale_size [480]: for a portrait frame (H > W) W becomes short_side and H
    short_side·H/W rounded down to a multiple; otherwise (landscape or square) H becomes
    short_side and W is derived. A 480×854 DAVIS frame becomes 480×832.

    Returns:
        (new_height, new_width).

    Raises:
        ValueError: the longer side would round down to 0.
    """
    if height > width:
        new_w, new_h = short_side, int((short_side * height / width) // multiple * multiple)
    else:
        new_h, new_w = short_side, int((short_side * width / height) // multiple * multiple)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"a {height}x{width} frame with short_side={short_side} rounds its longer side down to 0 "
            f"(long_side_multiple={multiple})"
        )
    return new_h, new_w


def frame_tensor(frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An RGB frame as the backbone's input.

    Args:
        frame: (H, W, 3) uint8 RGB.
        size: (height, width) to resize to (see `resized_frame_size`).

    Returns:
        (3, height, width) float32, bilinearly resized, normalised with FRAME_MEAN / FRAME_STD.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {frame.shape}")
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
    if tuple(image.shape[1:]) != tuple(size):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(FRAME_MEAN).view(3, 1, 1)
    std = torch.tensor(FRAME_STD).view(3, 1, 1)
    return (image - mean) / std


@torch.no_grad()
def patch_features(backbone: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """L2-normalised last-block patch tokens of one frame.

    Args:
        backbone: a ViT with `get_intermediate_layers(x, n)` (tokens through the final norm, [CLS]
            first), on the image's device.
        image: (3, H, W), H and W multiples of the patch size.

    Returns:
        (h·w, D) unit-norm features in row-major patch order.
    """
    tokens = backbone.get_intermediate_layers(image[None], n=1)[0]
    return F.normalize(tokens[0, 1:].float(), dim=-1, p=2)


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int], num_channels: int) -> torch.Tensor:
    """One-hot soft labels of the first annotation on the patch grid (reference read_seg).

    Args:
        mask: (H, W) uint8 object ids at the original size; void (255) counts as background.
        grid: (h, w) patch grid of the resized frame.
        num_channels: C = 1 + number of objects; ids >= C are refused.

    Returns:
        (C, h, w) float32 one-hot labels.
    """
    mask = np.where(mask == VOID_ID, 0, mask).astype(np.uint8)
    if mask.max() >= num_channels:
        raise ValueError(f"mask holds id {int(mask.max())} but only {num_channels} channels were asked for")
    small = np.array(Image.fromarray(mask).resize((grid[1], grid[0]), Image.NEAREST))
    labels = torch.from_numpy(small.astype(np.int64))
    return F.one_hot(labels, num_channels).permute(2, 0, 1).float()


@functools.lru_cache(maxsize=32)
def _window_mask(rows: tuple[int, int], band: tuple[int, int], width: int, radius: int,
                 device: torch.device) -> torch.Tensor:
    """(targets, sources) bool for target rows [rows) and source rows [band) of a width-w grid:
    source (p, q) lies within ±radius rows and columns of target (i, j). Cached: every frame of a
    video asks for the same masks."""
    targets = torch.arange(rows[0] * width, rows[1] * width, device=device)
    sources = torch.arange(band[0] * width, band[1] * width, device=device)
    near_r = (targets[:, None] // width - sources[None, :] // width).abs() <= radius
    near_c = (targets[:, None] % width - sources[None, :] % width).abs() <= radius
    return near_r & near_c


def propagate_labels(
    target: torch.Tensor,
    sources: torch.Tensor,
    source_labels: torch.Tensor,
    grid: tuple[int, int],
    size_mask_neighborhood: int = 12,
    topk: int = 5,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Soft labels of a target frame from its context (one step of the reference's
    label_propagation).

    Args:
        target: (h·w, D) unit-norm features of the target frame.
        sources: (n, h·w, D) unit-norm features of the n context frames.
        source_labels: (n, C, h, w) soft labels of the context frames.
        grid: (h, w).
        size_mask_neighborhood: window radius in patches (0: every source patch is eligible).
        topk: sources kept per target patch, over all context frames together.
        temperature: affinity exp(cos / temperature).

    Returns:
        (C, h, w) soft labels of the target frame; each patch's weights sum to 1, so each patch's
        labels sum to what its sources' do.
    """
    height, width = grid
    n_ctx, n_patches, _ = sources.shape
    if target.shape[0] != n_patches or n_patches != height * width:
        raise ValueError(
            f"features do not match the {height}x{width} grid: target {tuple(target.shape)}, "
            f"sources {tuple(sources.shape)}"
        )
    channels = source_labels.shape[1]
    labels = source_labels.reshape(n_ctx, channels, n_patches).permute(0, 2, 1)  # (n, h·w, C)
    radius = size_mask_neighborhood if size_mask_neighborhood > 0 else max(height, width)
    reach = min(height, 2 * radius + 1)
    rows_per_chunk = max(1, AFFINITY_BUDGET // max(1, width * width * n_ctx * reach))
    out = torch.empty(n_patches, channels, dtype=labels.dtype, device=target.device)
    for r0 in range(0, height, rows_per_chunk):
        rows = range(r0, min(height, r0 + rows_per_chunk))
        band = range(max(0, rows.start - radius), min(height, rows.stop + radius))
        tgt = target[rows.start * width: rows.stop * width]  # (T, D)
        src = sources[:, band.start * width: band.stop * width]  # (n, S, D)
        aff = torch.exp(torch.einsum("td,nsd->tns", tgt, src) / temperature)
        if size_mask_neighborhood > 0:
            window = _window_mask((rows.start, rows.stop), (band.start, band.stop), width, radius, target.device)
            aff = aff * window[:, None, :]
        aff = aff.reshape(tgt.shape[0], -1)  # (T, n·S): every context frame's sources together
        k = min(topk, aff.shape[1])
        kth = torch.topk(aff, k=k, dim=1).values[:, -1:]
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=1, keepdim=True)
        src_labels = labels[:, band.start * width: band.stop * width].reshape(-1, channels)  # (n·S, C)
        out[rows.start * width: rows.stop * width] = aff @ src_labels
    return out.T.reshape(channels, height, width)


def labels_to_mask(soft: torch.Tensor, patch_size: int, size: tuple[int, int]) -> np.ndarray:
    """Soft patch labels -> object-id mask at the original frame size.

    Args:
        soft: (C, h, w) soft labels.
        patch_size: upsampling factor p.
        size: (H, W) original frame size.

    Returns:
        (H, W) uint8 ids: bilinear ×p upsampling, per-channel min-max normalisation (channels whose
        maximum is positive), argmax, nearest-neighbour resize to (H, W).
    """
    up = F.interpolate(soft[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    normalised = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)), up - lo)
    up = torch.where(hi > 0, normalised, up)
    ids = up.argmax(dim=0).to(torch.uint8).cpu().numpy()
    if ids.shape != tuple(size):
        ids = np.array(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))
    return ids


def segment_sequence(
    backbone: nn.Module,
    frames: Iterable[np.ndarray],
    first_mask: np.ndarray,
    settings: PropagationSettings = PropagationSettings(),
    num_objects: int | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """Propagate the first frame's annotation through a video.

    Args:
        backbone: a ViT (`get_intermediate_layers`, `patch_size`) in eval mode, on `device`.
        frames: the video's frames in order, (H, W, 3) uint8 RGB each, the first frame included;
            may be a lazy iterator.
        first_mask: (H, W) uint8 ids of the first frame (void 255 as background).
        settings: the propagation hyperparameters.
        num_objects: K; None takes the largest id of `first_mask`.
        device: where features and labels live.

    Yields:
        (H, W) uint8 predicted ids of frames 1, 2, ... (the first frame is given, not yielded).

    Raises:
        ValueError: a frame whose size differs from the first mask, or a resized size that is not
            a multiple of the patch size.
    """
    patch = int(backbone.patch_size)
    device = torch.device(device)
    height, width = first_mask.shape
    size = resized_frame_size(height, width, settings.short_side, settings.long_side_multiple)
    if size[0] % patch or size[1] % patch:
        raise ValueError(
            f"frames resized to {size[0]}x{size[1]} are not multiples of the patch size {patch} "
            f"(short_side={settings.short_side}, long_side_multiple={settings.long_side_multiple})"
        )
    grid = (size[0] // patch, size[1] // patch)
    objects = int(first_mask[first_mask != VOID_ID].max(initial=0)) if num_objects is None else num_objects
    frames = iter(frames)

    def features(frame: np.ndarray) -> torch.Tensor:
        if frame.shape[:2] != (height, width):
            raise ValueError(f"frame of size {frame.shape[1]}x{frame.shape[0]}, the first is {width}x{height}")
        return patch_features(backbone, frame_tensor(frame, size).to(device))

    first_feats = features(next(frames))
    first_labels = first_frame_labels(first_mask, grid, objects + 1).to(device)
    previous: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames or None)
    for frame in frames:
        feats = features(frame)
        context = [(first_feats, first_labels), *previous]
        soft = propagate_labels(
            feats,
            torch.stack([f for f, _ in context]),
            torch.stack([lab for _, lab in context]),
            grid,
            settings.size_mask_neighborhood,
            settings.topk,
            settings.temperature,
        )
        if settings.n_last_frames > 0:
            previous.append((feats, soft))
        yield labels_to_mask(soft, patch, (height, width))
