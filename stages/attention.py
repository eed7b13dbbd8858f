"""Self-attention maps of the last block's CLS token (paper Figs 1 and 3) and their Jaccard index
against ground-truth masks (Fig. 4's table), stage `attention`; as the reference's
visualize_attention.py.

For each image: resized to ``image_size`` x ``image_size`` (bilinear, as the reference's
``transforms.Resize((480, 480))``), cut at the bottom/right to a multiple of the patch size,
ImageNet-normalised; ``backbone.get_last_selfattention`` gives the last block's attention, of which
the CLS query's row over the patch tokens is kept per head, (heads, h, w) with h, w the patch grid
(the CLS→CLS weight is left out, as the reference does).

Masks (the reference's thresholding): per head the patch weights are sorted ascending, divided by
their sum, cumulated, and the patches whose cumulative mass exceeds ``1 - threshold`` are kept: the
smallest set of the largest weights that holds at least ``threshold`` (0.6) of the mass. Maps and
masks are upsampled to pixels by repeating each patch ``patch_size`` times in both directions
(nearest).

Outputs under ``<paths.plots>/attention/`` (the folder replaced atomically), one folder per image:
``img.png`` (the resized input), ``attn-head<j>.png`` (the head's map, min-max scaled, viridis, as
the reference's ``plt.imsave``) and ``mask-head<j>.png`` (the mask, 0/255).

Jaccard (when ``attention.voc_root`` is set; PASCAL VOC layout): ``JPEGImages/<id>.jpg`` with
``SegmentationObject/<id>.png`` (preferred) or ``SegmentationClass/<id>.png``, palette (index)
PNGs; the ids of ``ImageSets/Segmentation/<voc_split>.txt`` when it exists, else every mask. The
ground truth is resized to the image's size with nearest neighbours and cut like the image; its
foreground is every pixel with an index other than 0 and 255, and 255 (void, the objects' borders)
is left out of both intersection and union. J = |M ∩ G| / |M ∪ G| over the non-void pixels, per
image and head (undefined, and skipped, when that union is empty). Reported in percent, as Fig. 4:
the mean over images of each head (``jaccard_head<j>``), the best head's (``jaccard_best_head``)
and the mean over heads (``jaccard_mean_heads``); with ``attention.baselines`` the same for a
randomly initialised backbone of the same architecture (torch seed 0): ``random_jaccard_*``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from stages.atomic import atomic_dir, atomic_file, write_json
from stages.cli import StageError, run_stage
from stages.device import resolve_device
from stages.params import Params

logger = logging.getLogger(__name__)

#: scikit-image's bundled photos shown when no image folder is given (skimage.data.<name>()).
DEFAULT_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VOID = 255
RANDOM_INIT_SEED = 0


# ------------------------------------------------------------------------------------------------
# attention maps and masks
# ------------------------------------------------------------------------------------------------


def prepare_image(image: Image.Image, image_size: int, patch_size: int) -> torch.Tensor:
    """Resize to image_size x image_size (bilinear), normalise, cut to a multiple of the patch.

    Returns:
        (3, H, W) float32 with H = W = image_size - image_size % patch_size.
    """
    from torchvision import transforms

    from stages.dino.augment import normalize, to_rgb

    if image_size < patch_size:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch_size}")
    tensor = transforms.Compose([transforms.Resize((image_size, image_size)), normalize()])(to_rgb(image))
    side = image_size - image_size % patch_size
    return tensor[:, :side, :side]


@torch.no_grad()
def cls_attention(backbone: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The last block's CLS-to-patch attention per head.

    Args:
        backbone: a ViT with ``get_last_selfattention`` and ``patch_size``.
        image: (3, H, W) or (1, 3, H, W), H and W multiples of the patch size.

    Returns:
        (heads, H / p, W / p) float32 on the CPU (rows of the softmax; the CLS→CLS weight left out).
    """
    if image.ndim == 3:
        image = image[None]
    patch = backbone.patch_size
    grid_h, grid_w = image.shape[-2] // patch, image.shape[-1] // patch
    device = next(backbone.parameters()).device
    attn = backbone.get_last_selfattention(image.to(device))  # (1, heads, 1 + N, 1 + N)
    heads = attn.shape[1]
    return attn[0, :, 0, 1:].reshape(heads, grid_h, grid_w).float().cpu()


def mass_masks(attention: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Per head, the smallest set of largest weights holding at least `threshold` of the mass.

    The reference's thresholding: sort ascending, normalise by the sum, cumulate, keep the
    positions whose cumulative mass exceeds ``1 - threshold``.

    Args:
        attention: (heads, ...) non-negative weights.
        threshold: mass to keep, in (0, 1].

    Returns:
        Bool tensor of `attention`'s shape.
    """
    heads = attention.shape[0]
    flat = attention.reshape(heads, -1).double()
    values, order = torch.sort(flat, dim=1)
    cumulative = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    keep_sorted = cumulative > (1.0 - threshold)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(attention.shape)


def upsample(maps: torch.Tensor | np.ndarray, patch_size: int) -> np.ndarray:
    """Repeat every cell patch_size times along the last two axes (nearest): (..., h, w) -> (..., h·p, w·p)."""
    array = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    return array.repeat(patch_size, axis=-2).repeat(patch_size, axis=-1)


# ------------------------------------------------------------------------------------------------
# Jaccard against VOC-layout masks
# ------------------------------------------------------------------------------------------------


def jaccard(prediction: np.ndarray, target: np.ndarray, void: int = VOID) -> float:
    """Jaccard index of a binary mask against a label mask, void pixels left out.

    Args:
        prediction: (H, W) bool (or 0/1) predicted foreground.
        target: (H, W) integer label mask: 0 background, `void` ignored, anything else foreground.
        void: the ignored label (VOC: 255).

    Returns:
        |P ∩ G| / |P ∪ G| over the non-void pixels, in [0, 1]; NaN when that union is empty.
    """
    prediction = np.asarray(prediction).astype(bool)
    target = np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    valid = target != void
    truth = (target != 0) & valid
    pred = prediction & valid
    union = np.count_nonzero(pred | truth)
    if union == 0:
        return float("nan")
    return np.count_nonzero(pred & truth) / union


def voc_samples(root: str | Path, split: str = "val", max_images: int | None = None) -> list[tuple[str, Path, Path]]:
    """(id, image path, mask path) of a VOC-layout folder (module docstring).

    Raises:
        StageError: no mask folder, or an image or mask file missing (named).
    """
    root = Path(root)
    masks = next((root / name for name in ("SegmentationObject", "SegmentationClass") if (root / name).is_dir()), None)
    if masks is None:
        raise StageError(f"attention.voc_root = {str(root)!r}: neither SegmentationObject/ nor SegmentationClass/ found")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if listing.is_file():
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    else:
        logger.info("%s not found: evaluating every mask of %s", listing, masks)
        ids = sorted(p.stem for p in masks.glob("*.png"))
    if max_images is not None:
        ids = ids[:max_images]
    samples = []
    for image_id in ids:
        image, mask = root / "JPEGImages" / f"{image_id}.jpg", masks / f"{image_id}.png"
        for path in (image, mask):
            if not path.is_file():
                raise StageError(f"{path}: missing (listed in {listing if listing.is_file() else masks})")
        samples.append((image_id, image, mask))
    if not samples:
        raise StageError(f"attention.voc_root = {str(root)!r}: no images to evaluate")
    return samples


def read_label_mask(path: Path, size: int, side: int) -> np.ndarray:
    """A VOC palette/index PNG as labels, resized to size x size (nearest), cut to side x side.

    Raises:
        StageError: unreadable, or not a palette/grayscale index image.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise StageError(f"{path}: mode {img.mode}; a VOC mask is a palette (P) or index (L) PNG")
            resized = img.resize((size, size), Image.NEAREST)
            labels = np.array(resized)
    except (OSError, SyntaxError) as exc:
        raise StageError(f"{path}: unreadable mask ({exc})") from exc
    return labels[:side, :side]


def voc_jaccard(backbone: nn.Module, samples: Sequence[tuple[str, Path, Path]], image_size: int,
                threshold: float = 0.6, desc: str = "jaccard") -> np.ndarray:
    """Jaccard (fraction) of every head's mass mask on every sample.

    Returns:
        (n_samples, heads) float64; NaN where undefined.
    """
    patch = backbone.patch_size
    rows = []
    for image_id, image_path, mask_path in tqdm(samples, desc=desc, unit="img", disable=len(samples) < 2):
        try:
            with Image.open(image_path) as img:
                tensor = prepare_image(img.convert("RGB"), image_size, patch)
        except (OSError, SyntaxError) as exc:
            raise StageError(f"{image_path}: unreadable image ({exc})") from exc
        masks = upsample(mass_masks(cls_attention(backbone, tensor), threshold), patch)  # (heads, H, W)
        target = read_label_mask(mask_path, image_size, tensor.shape[-1])
        rows.append([jaccard(m, target) for m in masks])
    return np.asarray(rows, dtype=np.float64)


def summarise(scores: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Per-head means over images (percent), the best head's and the mean over heads."""
    with np.errstate(all="ignore"):
        per_head = 100.0 * np.nanmean(scores, axis=0) if scores.size else np.zeros(0)
    out = {f"{prefix}jaccard_head{j}": float(v) for j, v in enumerate(per_head)}
    out[f"{prefix}jaccard_best_head"] = float(np.nanmax(per_head)) if per_head.size else float("nan")
    out[f"{prefix}jaccard_mean_heads"] = float(np.nanmean(per_head)) if per_head.size else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# images and pictures
# ------------------------------------------------------------------------------------------------


def default_images() -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled astronaut, chelsea and coffee photos (no network)."""
    from skimage import data

    return [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in DEFAULT_IMAGES]


def folder_images(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """Every image of a folder (sorted by name), as (file stem, RGB image).

    Raises:
        StageError: no image in the folder, or one is unreadable (named).
    """
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise StageError(f"attention.images = {str(folder)!r}: no {'/'.join(IMAGE_SUFFIXES)} files")
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append((path.stem, img.convert("RGB")))
        except (OSError, SyntaxError) as exc:
            raise StageError(f"{path}: unreadable image ({exc})") from exc
    return images


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def colourise(attention_map: np.ndarray) -> np.ndarray:
    """(H, W) weights -> (H, W, 3) uint8, min-max scaled through viridis (as plt.imsave)."""
    from matplotlib import colormaps

    lo, hi = float(attention_map.min()), float(attention_map.max())
    scaled = (attention_map - lo) / (hi - lo) if hi > lo else np.zeros_like(attention_map, dtype=np.float64)
    return (colormaps["viridis"](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _denormalise(tensor: torch.Tensor) -> np.ndarray:
    from stages.dino.augment import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((tensor * std + mean).clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).numpy()


def picture_files(tensor: torch.Tensor, attention: torch.Tensor, masks: torch.Tensor, patch: int) -> dict[str, bytes]:
    """PNG bytes of one image's pictures: img.png, attn-head<j>.png, mask-head<j>.png.

    Args:
        tensor: (3, H, W) the normalised input.
        attention: (heads, H / p, W / p) CLS attention.
        masks: (heads, H / p, W / p) bool mass masks.
        patch: the patch size p.
    """
    files = {"img.png": _png(_denormalise(tensor))}
    for j, (amap, mask) in enumerate(zip(upsample(attention, patch), upsample(masks, patch))):
        files[f"attn-head{j}.png"] = _png(colourise(amap))
        files[f"mask-head{j}.png"] = _png(mask.astype(np.uint8) * 255)
    return files


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def _safe_name(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "image"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def run(params: Params) -> dict[str, float]:
    """Stage `attention` (module docstring).

    Returns:
        ``n_images`` and ``heads``; with a VOC root also ``n_voc_images``, ``jaccard_head<j>``,
        ``jaccard_best_head``, ``jaccard_mean_heads`` (percent), and with baselines the same keys
        prefixed ``random_``.
    """
    from stages.dino.backbones import build_backbone_from_params
    from stages.dino.checkpoint import load_teacher, teacher_path

    cfg, model = params.attention, params.model
    if model.arch == "resnet50":
        raise StageError("the attention stage needs a ViT; model.arch = 'resnet50' has no self-attention")
    teacher_path(params)
    device = resolve_device(cfg.device, "attention.device")
    backbone = load_teacher(params).to(device).eval()
    patch = backbone.patch_size
    if cfg.image_size < patch:
        raise StageError(f"attention.image_size = {cfg.image_size} is smaller than model.patch_size = {patch}")
    images = folder_images(cfg.images) if cfg.images is not None else default_images()

    metrics: dict[str, float] = {"n_images": float(len(images))}
    pictures: dict[str, dict[str, bytes]] = {}
    taken: set[str] = set()
    for name, image in tqdm(images, desc="attention maps", unit="img", disable=len(images) < 2):
        tensor = prepare_image(image, cfg.image_size, patch)
        attention = cls_attention(backbone, tensor)
        metrics["heads"] = float(attention.shape[0])
        pictures[_safe_name(name, taken)] = picture_files(tensor, attention, mass_masks(attention, cfg.threshold), patch)
    if cfg.voc_root is not None:
        samples = voc_samples(cfg.voc_root, cfg.voc_split, cfg.max_images)
        metrics["n_voc_images"] = float(len(samples))
        metrics.update(summarise(voc_jaccard(backbone, samples, cfg.image_size, cfg.threshold)))
        if cfg.baselines:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG is left alone
                torch.manual_seed(RANDOM_INIT_SEED)
                random_backbone = build_backbone_from_params(model, drop_path_rate=0.0)
            random_backbone = random_backbone.to(device).eval()
            scores = voc_jaccard(random_backbone, samples, cfg.image_size, cfg.threshold, "jaccard (random)")
            metrics.update(summarise(scores, "random_"))
        logger.info("Jaccard on %d VOC images: best head %.2f%%, mean over heads %.2f%%", len(samples),
                    metrics["jaccard_best_head"], metrics["jaccard_mean_heads"])
    with atomic_dir(Path(params.paths.plots) / "attention") as tmp:
        for folder, files in pictures.items():
            for file_name, data in files.items():
                with atomic_file(tmp / folder / file_name, "wb") as handle:
                    handle.write(data)
    write_json(Path(params.paths.metrics) / "attention.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("attention", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
