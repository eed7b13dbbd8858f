"""Attention maps: the mass-threshold masks against a greedy loop, the Jaccard index by hand, a
generated PASCAL-VOC-layout fixture scored through a backbone whose attention is known, and the
stage end to end with a tiny ViT checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.attention import (
    cls_attention,
    jaccard,
    mass_masks,
    summarise,
    upsample,
    voc_jaccard,
    voc_samples,
)
from stages.attention import run as attention_run
from stages.cli import StageError
from stages.dino.backbones import build_backbone_from_params
from stages.params import ParamsError, validate_params
from test_linear import eval_config
from tiny_config import save_random_teacher

#: VOC class indices given to the fixture's objects (person, cat, bottle, aeroplane).
VOC_CLASSES = {"astronaut": 15, "chelsea": 8, "coffee": 5, "rocket": 1}


def make_voc_fixture(root: Path, size: int = 32, patch: int = 4, names=tuple(VOC_CLASSES)) -> dict[str, np.ndarray]:
    """A tiny PASCAL-VOC-layout folder from scikit-image's bundled photos, with known masks.

    Writes ``JPEGImages/<id>.jpg`` (the photo resized to size x size), ``SegmentationClass/<id>.png``
    (a palette PNG: a patch-aligned rectangle of the object's class index, surrounded by a one-pixel
    void ring of 255 just outside it, background 0) and ``ImageSets/Segmentation/val.txt``.

    Returns:
        ``{id: label mask (size, size) uint8}``, as written.
    """
    from skimage import data

    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [0] * 768
    for index in range(256):  # any distinct colours; the indices are what counts
        palette[3 * index : 3 * index + 3] = [(index * 37) % 256, (index * 91) % 256, (index * 53) % 256]
    masks = {}
    cells = size // patch
    for k, name in enumerate(names):
        image_id = f"2007_{k:06d}"
        photo = getattr(data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        Image.fromarray(photo[..., :3]).resize((size, size), Image.BILINEAR).save(root / "JPEGImages" / f"{image_id}.jpg")
        top, left = (1 + k) % 3 + 1, (2 + k) % 3 + 1  # in patches
        height, width = cells // 2, cells // 2 - (k % 2)
        label = np.zeros((size, size), np.uint8)
        y0, y1, x0, x1 = top * patch, (top + height) * patch, left * patch, (left + width) * patch
        label[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
        label[y0:y1, x0:x1] = VOC_CLASSES[name]
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
        masks[image_id] = label
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in masks))
    return masks


# ------------------------------------------------------------------------------------------------
# masks and maps
# ------------------------------------------------------------------------------------------------


def greedy_mask(weights: np.ndarray, threshold: float) -> np.ndarray:
    """Largest weights first, until their share of the total reaches the threshold."""
    total = float(sum(weights))
    keep = np.zeros(len(weights), bool)
    kept = 0.0
    for i in sorted(range(len(weights)), key=lambda j: -weights[j]):
        if kept / total >= threshold:
            break
        keep[i] = True
        kept += weights[i]
    return keep


@pytest.mark.parametrize("threshold", [0.6, 0.3, 0.9])
def test_masks_keep_the_mass_and_no_more(threshold: float) -> None:
    rng = np.random.default_rng(0)
    attention = torch.from_numpy(rng.dirichlet(np.full(49, 0.3), size=4)).float().reshape(4, 7, 7)
    masks = mass_masks(attention, threshold)
    assert masks.shape == attention.shape and masks.dtype == torch.bool
    for head in range(4):
        w = attention[head].flatten().double().numpy()
        keep = masks[head].flatten().numpy()
        share = w[keep].sum() / w.sum()
        assert share >= threshold - 1e-9
        assert share - w[keep].min() / w.sum() < threshold  # without its smallest weight: too little
        np.testing.assert_array_equal(keep, greedy_mask(w, threshold))


def test_masks_with_full_mass_keep_exactly_the_nonzero_weights() -> None:
    attention = torch.tensor([[[0.0, 0.5], [0.25, 0.25]]])
    assert mass_masks(attention, 1.0).tolist() == [[[False, True], [True, True]]]


def test_upsample_is_nearest_interpolation() -> None:
    maps = torch.rand(3, 5, 4)
    expected = F.interpolate(maps[None], scale_factor=4, mode="nearest")[0]
    np.testing.assert_array_equal(upsample(maps, 4), expected.numpy())


def test_cls_attention_is_the_cls_row_of_the_last_block(tiny) -> None:
    params = validate_params(tiny)
    torch.manual_seed(0)
    vit = build_backbone_from_params(params.model, drop_path_rate=0.0).eval()
    image = torch.randn(3, 24, 20)
    got = cls_attention(vit, image)
    full = vit.get_last_selfattention(image[None])[0]
    assert got.shape == (2, 6, 5)
    torch.testing.assert_close(got.reshape(2, -1), full[:, 0, 1:])
    torch.testing.assert_close(got.sum(dim=(1, 2)) + full[:, 0, 0], torch.ones(2))


# ------------------------------------------------------------------------------------------------
# Jaccard
# ------------------------------------------------------------------------------------------------


def test_jaccard_by_hand() -> None:
    target = np.array([[0, 0, 255, 7],
                       [0, 255, 7, 7],
                       [0, 0, 255, 7]], np.uint8)  # foreground: the four 7s; void: the 255s
    fg = np.isin(target, (7,))
    assert jaccard(fg, target) == 1.0  # identical
    assert jaccard(~fg & (target != 255), target) == 0.0  # disjoint
    assert jaccard(fg | (target == 255), target) == 1.0  # predicting void pixels costs nothing
    pred = np.zeros_like(fg)
    pred[0, 3] = pred[1, 2] = True  # two of the four foreground pixels ...
    pred[0, 0] = True  # ... and one background pixel: 2 / (4 + 1)
    assert jaccard(pred, target) == pytest.approx(2 / 5)
    assert math.isnan(jaccard(np.zeros((2, 2), bool), np.array([[0, 255], [0, 0]])))  # nothing to compare
    with pytest.raises(ValueError, match="shape"):
        jaccard(fg[:, :2], target)


class KnownAttention(torch.nn.Module):
    """A stand-in ViT whose last-block CLS attention is given: head 0 uniform over the foreground
    patches of the next ground-truth mask, head 1 uniform over the background patches."""

    def __init__(self, masks: list[np.ndarray], patch: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.weight = torch.nn.Parameter(torch.zeros(1))  # for the device
        self.masks = list(masks)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        label = self.masks.pop(0)
        cells = torch.from_numpy(np.isin(label, (0, 255), invert=True)[::p, ::p].copy()).flatten().float()
        n = cells.shape[0]
        attn = torch.zeros(1, 2, 1 + n, 1 + n)
        attn[0, 0, 0, 1:] = cells / cells.sum()
        attn[0, 1, 0, 1:] = (1 - cells) / (1 - cells).sum()
        return attn


def test_voc_fixture_scored_through_known_attention(tmp_path: Path) -> None:
    masks = make_voc_fixture(tmp_path / "voc", size=32, patch=4)
    samples = voc_samples(tmp_path / "voc", "val")
    assert [s[0] for s in samples] == list(masks)
    # Keeping all the mass: head 0 is the foreground exactly (the void ring left out), head 1 its
    # complement.
    scores = voc_jaccard(KnownAttention(list(masks.values()), 4), samples, 32, threshold=1.0)
    np.testing.assert_array_equal(scores, [[1.0, 0.0]] * len(masks))
    summary = summarise(scores)
    assert summary == {"jaccard_head0": 100.0, "jaccard_head1": 0.0, "jaccard_best_head": 100.0,
                       "jaccard_mean_heads": 50.0}
    # Keeping 60%: head 0 keeps ceil(0.6 k) of its k equal foreground patches.
    scores = voc_jaccard(KnownAttention(list(masks.values()), 4), samples, 32, threshold=0.6)
    for row, label in zip(scores, masks.values()):
        k = int(np.isin(label, (0, 255), invert=True).sum()) // 16
        assert row[0] == pytest.approx(math.ceil(0.6 * k) / k) and row[1] == 0.0
    # max_images, and a missing image named.
    assert len(voc_samples(tmp_path / "voc", "val", max_images=2)) == 2
    next((tmp_path / "voc" / "JPEGImages").glob("*.jpg")).unlink()
    with pytest.raises(StageError, match="JPEGImages"):
        voc_samples(tmp_path / "voc", "val")


def test_voc_masks_must_be_index_images(tmp_path: Path) -> None:
    masks = make_voc_fixture(tmp_path / "voc", names=("chelsea",))
    image_id = next(iter(masks))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "voc" / "SegmentationClass" / f"{image_id}.png")
    samples = voc_samples(tmp_path / "voc")
    with pytest.raises(StageError, match="palette"):
        voc_jaccard(KnownAttention(list(masks.values()), 4), samples, 32)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def test_stage_end_to_end_with_a_tiny_vit(tmp_path: Path) -> None:
    make_voc_fixture(tmp_path / "voc", size=40, patch=4)
    params = validate_params(eval_config(tmp_path, attention={"image_size": 34, "device": "cpu",
                                                              "voc_root": str(tmp_path / "voc")}))
    vit = save_random_teacher(params, seed=3)
    metrics = attention_run(params)
    assert metrics["n_images"] == 3 and metrics["heads"] == 2 and metrics["n_voc_images"] == 4
    expected_keys = {"jaccard_head0", "jaccard_head1", "jaccard_best_head", "jaccard_mean_heads"}
    assert set(metrics) == {"n_images", "heads", "n_voc_images"} | expected_keys | {f"random_{k}" for k in expected_keys}
    for key in expected_keys:
        assert 0.0 <= metrics[key] <= 100.0 and 0.0 <= metrics[f"random_{key}"] <= 100.0
    assert metrics["jaccard_best_head"] == max(metrics["jaccard_head0"], metrics["jaccard_head1"])
    assert json.loads((Path(params.paths.metrics) / "attention.json").read_text()) == pytest.approx(metrics)

    out = Path(params.paths.plots) / "attention"
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "chelsea", "coffee"]
    from skimage import data

    from stages.attention import prepare_image

    for name in ("astronaut", "chelsea", "coffee"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["attn-head0.png", "attn-head1.png", "img.png", "mask-head0.png", "mask-head1.png"]
        # 34 px cut to 32 (8 x 8 patches of 4); the saved masks are the recomputed ones.
        tensor = prepare_image(Image.fromarray(getattr(data, name)()), 34, 4)
        masks = upsample(mass_masks(cls_attention(vit, tensor), 0.6), 4)
        for head in range(2):
            saved = np.array(Image.open(out / name / f"mask-head{head}.png"))
            assert saved.shape == (32, 32)
            np.testing.assert_array_equal(saved == 255, masks[head])
        assert Image.open(out / name / "attn-head0.png").size == (32, 32)


def test_stage_on_an_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (25, 25), dtype=np.uint8)).save(folder / "b b.jpg")
    (folder / "notes.txt").write_text("not an image")
    params = validate_params(eval_config(tmp_path, attention={"image_size": 16, "device": "cpu", "images": str(folder)}))
    save_random_teacher(params, seed=3)
    metrics = attention_run(params)
    assert metrics == {"n_images": 2.0, "heads": 2.0}
    assert sorted(p.name for p in (Path(params.paths.plots) / "attention").iterdir()) == ["a", "b_b"]


def test_missing_folders_are_params_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="attention.voc_root"):
        validate_params(eval_config(tmp_path, attention={"voc_root": str(tmp_path / "nope")}))
