"""Per-frame DAVIS measures J (region) and F (boundary) and their per-object statistics.

Definitions as the DAVIS-2017 evaluation toolkit (davis2017-evaluation, `metrics.py` and
`utils.db_statistics`; Perazzi et al., "A Benchmark Dataset and Evaluation Methodology for Video
Object Segmentation", CVPR 2016):

- J, region similarity: the Jaccard index |S ∩ G| / |S ∪ G| over the non-void pixels; 1 when the
  union is empty (both masks empty).
- F, boundary accuracy: the F-measure of boundary precision and recall. The boundaries are
  one-pixel maps (`boundary_map`, the toolkit's seg2bmap: a pixel is on the boundary when it
  differs from its right, bottom or bottom-right neighbour) of the masks with the void pixels
  cleared; a boundary pixel is matched when the other mask's boundary, dilated by a disk of
  radius ceil(0.008 × image diagonal), covers it. Edge cases as the toolkit: no predicted and no
  true boundary -> P = R = 1 (F = 1); only one of them empty -> F = 0.
- Statistics over the evaluated frames of one object: Mean, Recall (fraction of frames with a
  value > 0.5) and Decay (mean over the first quarter of the frames minus the mean over the last,
  with the toolkit's 4 bins whose edges are round(linspace(1, n, 5)) - 1, ends included).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

BOUNDARY_THRESHOLD = 0.008  # of the image diagonal, as the toolkit's bound_th
DECAY_BINS = 4


def _check_shapes(*arrays: np.ndarray | None) -> None:
    shapes = {a.shape for a in arrays if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"masks must have the same shape, got {sorted(shapes)}")


def region_similarity(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two binary masks, void pixels left out.

    Args:
        annotation: (H, W) ground-truth mask (nonzero = object).
        segmentation: (H, W) predicted mask (nonzero = object).
        void: optional (H, W) mask of pixels to ignore.

    Returns:
        J in [0, 1]; 1 when both masks are empty outside the void pixels.
    """
    _check_shapes(annotation, segmentation, void)
    gt = np.asarray(annotation).astype(bool)
    pred = np.asarray(segmentation).astype(bool)
    valid = np.ones_like(gt) if void is None else ~np.asarray(void).astype(bool)
    union = np.count_nonzero((gt | pred) & valid)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(gt & pred & valid) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a binary mask (the toolkit's seg2bmap at the mask's own size).

    A pixel is a boundary pixel when its value differs from its right, bottom or bottom-right
    neighbour; in the last row only the right neighbour counts, in the last column only the
    bottom one, and the bottom-right corner is never a boundary. The boundary thus lies half a
    pixel towards the origin from the true region edge.

    Args:
        mask: (H, W) binary mask.

    Returns:
        (H, W) bool boundary map.
    """
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map needs a 2-D mask, got shape {seg.shape}")
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    diag = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    diag[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ diag)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def boundary_radius(shape: tuple[int, int], bound_th: float = BOUNDARY_THRESHOLD) -> int:
    """Matching tolerance in pixels: ceil(bound_th × diagonal), or bound_th itself when >= 1."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(*shape)))


def boundary_f_measure(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    void: np.ndarray | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> float:
    """F: boundary F-measure of a predicted mask against the ground truth (DAVIS toolkit).

    Args:
        annotation: (H, W) ground-truth mask.
        segmentation: (H, W) predicted mask.
        void: optional (H, W) mask of pixels cleared from both masks before the boundaries are
            taken.
        bound_th: tolerance as a fraction of the image diagonal (< 1) or in pixels (>= 1).

    Returns:
        F in [0, 1].
    """
    _check_shapes(annotation, segmentation, void)
    valid = np.ones(np.shape(annotation), dtype=bool) if void is None else ~np.asarray(void).astype(bool)
    gt_boundary = boundary_map(np.asarray(annotation).astype(bool) & valid)
    fg_boundary = boundary_map(np.asarray(segmentation).astype(bool) & valid)
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0
    structure = disk(boundary_radius(gt_boundary.shape, bound_th)).astype(bool)
    fg_dilated = ndimage.binary_dilation(fg_boundary, structure=structure)
    gt_dilated = ndimage.binary_dilation(gt_boundary, structure=structure)
    precision = np.count_nonzero(fg_boundary & gt_dilated) / n_fg
    recall = np.count_nonzero(gt_boundary & fg_dilated) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Mean, Recall and Decay of one object's per-frame values (the toolkit's db_statistics).

    Args:
        per_frame: (T,) values of J or F over the evaluated frames (NaN entries are ignored).

    Returns:
        (mean, recall, decay): nanmean, nanmean of (value > 0.5), and nanmean of the first of 4
        bins minus nanmean of the last; bin i spans frames ids[i]..ids[i+1] inclusive with
        ids = round(linspace(1, T, 5)) - 1, so neighbouring bins share their edge frame.
    """
    values = np.asarray(per_frame, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"db_statistics needs a non-empty 1-D array, got shape {values.shape}")
    with np.errstate(invalid="ignore"):
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        recall = float(np.nanmean(values > 0.5))
    edges = (np.round(np.linspace(1, values.size, DECAY_BINS + 1) + 1e-10) - 1).astype(int)
    first = values[edges[0]: edges[1] + 1]
    last = values[edges[DECAY_BINS - 1]: edges[DECAY_BINS] + 1]
    if np.isfinite(first).any() and np.isfinite(last).any():
        decay = float(np.nanmean(first) - np.nanmean(last))
    else:
        decay = math.nan
    return mean, recall, decay
