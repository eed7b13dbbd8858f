"""DAVIS-2017 label propagation and J&F scoring (stages.davis), against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.cli import StageError
from stages.davis import evaluate
from stages.davis import propagate as prop
from stages.davis.dataset import DavisLayoutError, read_mask, read_sequence_names
from stages.davis.metrics import boundary_f_measure, boundary_map, boundary_radius, db_statistics, region_similarity
from stages.davis.palette import VOID_ID, davis_palette, read_indexed_png, write_indexed_png
from stages.davis.propagate import PropagationSettings, propagate_labels, segment_sequence
from stages.params import validate_params
from tiny_config import save_random_teacher, tiny_params, write_params


# ---------------------------------------------------------------------------------------------
# palette


def test_palette_is_the_voc_colour_map():
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                5: (128, 0, 128), 6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour, index
    assert len({tuple(c) for c in palette}) == 256  # every id has its own colour


def test_indexed_png_roundtrip(tmp_path):
    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[1:3, 2:5] = 2
    mask[4, 6] = VOID_ID
    path = tmp_path / "seq" / "00001.png"
    write_indexed_png(path, mask)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    np.testing.assert_array_equal(read_indexed_png(path), mask)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DavisLayoutError, match="rgb.png"):
        read_mask(tmp_path / "rgb.png")


# ---------------------------------------------------------------------------------------------
# J


def test_region_similarity_hand_cases():
    gt = np.zeros((6, 8), bool)
    gt[1:4, 1:5] = True  # 12 pixels
    pred = np.zeros((6, 8), bool)
    pred[2:5, 3:7] = True  # 12 pixels, overlap rows 2-3 x cols 3-4 = 4
    assert region_similarity(gt, pred) == pytest.approx(4 / 20)
    # void pixels leave both the intersection and the union
    void = np.zeros((6, 8), bool)
    void[2, 3] = True  # one overlapping pixel
    void[4, 5:7] = True  # two predicted-only pixels
    assert region_similarity(gt, pred, void) == pytest.approx(3 / 17)
    empty = np.zeros((6, 8), bool)
    assert region_similarity(empty, empty) == 1.0  # both empty: J = 1, as the toolkit
    assert region_similarity(gt, empty) == 0.0
    assert region_similarity(empty, pred) == 0.0
    # a prediction inside the void only: the union outside the void is empty
    assert region_similarity(empty, pred, pred) == 1.0


@pytest.mark.parametrize("shift", [1, 3, 7])
def test_shifted_square_lowers_j_by_the_expected_amount(shift):
    side = 20
    gt = np.zeros((50, 60), bool)
    gt[10:30, 10:30] = True
    pred = np.roll(gt, shift, axis=1)
    expected = side * (side - shift) / (side * (side + shift))  # |∩| = 20·(20-s), |∪| = 20·(20+s)
    assert region_similarity(gt, pred) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# boundaries and F


def test_boundary_map_of_a_square():
    mask = np.zeros((12, 14), bool)
    r0, r1, c0, c1 = 3, 7, 4, 9  # inclusive
    mask[r0:r1 + 1, c0:c1 + 1] = True
    expected = set()
    expected |= {(r0 - 1, c) for c in range(c0 - 1, c1 + 1)}  # above: bottom / bottom-right inside
    expected |= {(r, c0 - 1) for r in range(r0, r1 + 1)}  # left: right neighbour inside
    expected |= {(r, c1) for r in range(r0, r1 + 1)}  # last column inside: right neighbour outside
    expected |= {(r1, c) for c in range(c0, c1 + 1)}  # last row inside: bottom neighbour outside
    got = {tuple(map(int, p)) for p in np.argwhere(boundary_map(mask))}
    assert got == expected


def test_boundary_map_at_the_image_edges():
    assert not boundary_map(np.ones((5, 6), bool)).any()  # a full mask has no boundary
    assert not boundary_map(np.zeros((5, 6), bool)).any()
    mask = np.zeros((5, 6), bool)
    mask[:, 3:] = True  # right half, touching the right and bottom edges
    got = {tuple(map(int, p)) for p in np.argwhere(boundary_map(mask))}
    assert got == {(r, 2) for r in range(5)}


def _brute_force_f(gt: np.ndarray, pred: np.ndarray, radius: int) -> float:
    """F from the boundary maps by explicit nearest-boundary distances (disk: dy² + dx² <= r²)."""
    gb, pb = np.argwhere(boundary_map(gt)), np.argwhere(boundary_map(pred))

    def matched(points, others):
        return sum(1 for p in points if any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= radius ** 2 for q in others))

    precision = matched(pb, gb) / len(pb)
    recall = matched(gb, pb) / len(gb)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_measure_cases():
    shape = (60, 80)  # diagonal 100 -> tolerance ceil(0.8) = 1 pixel
    assert boundary_radius(shape) == 1
    assert boundary_radius((480, 854)) == 8  # DAVIS 480p: ceil(0.008 * 979.7)
    gt = np.zeros(shape, bool)
    gt[20:40, 20:50] = True
    empty = np.zeros(shape, bool)
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(gt, empty) == 0.0
    assert boundary_f_measure(empty, gt) == 0.0
    assert boundary_f_measure(gt, np.roll(gt, 1, axis=0)) == 1.0  # within the tolerance
    for dy, dx in [(3, 0), (0, 4), (2, 5)]:
        pred = np.roll(np.roll(gt, dy, axis=0), dx, axis=1)
        expected = _brute_force_f(gt, pred, 1)
        assert 0 < expected < 1
        assert boundary_f_measure(gt, pred) == pytest.approx(expected)
    # a coarser tolerance in pixels (bound_th >= 1) matches the 3-pixel shift completely
    assert boundary_f_measure(gt, np.roll(gt, 3, axis=0), bound_th=3) == 1.0
    # void pixels are cleared from both masks: a disagreement inside the void does not count
    pred = gt.copy()
    pred[10:15, 60:70] = True
    void = np.zeros(shape, bool)
    void[8:17, 58:72] = True
    assert boundary_f_measure(gt, pred) < 1.0
    assert boundary_f_measure(gt, pred, void) == 1.0


def test_db_statistics_bins_by_hand():
    values = np.array([0.9, 0.7, 0.6, 0.5, 0.3, 0.1])
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(values.mean())
    assert recall == pytest.approx(3 / 6)  # 0.5 itself is not > 0.5
    # 6 frames: edges round(linspace(1, 6, 5)) - 1 = [0, 1, 3, 4, 5]; first bin frames 0-1, last 4-5
    assert decay == pytest.approx((0.9 + 0.7) / 2 - (0.3 + 0.1) / 2)
    # 12 frames: edges [0, 3, 6, 8, 11] (round(3.75) = 4, round(6.5) = 7, round(9.25) = 9)
    values = np.arange(12, dtype=float) / 11
    assert db_statistics(values)[2] == pytest.approx(values[0:4].mean() - values[8:12].mean())
    assert db_statistics(np.array([0.8]))[2] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# evaluate() on a hand-made DAVIS layout


def _write_layout(root: Path, name: str, frames: list[np.ndarray], masks: list[np.ndarray]) -> None:
    for t, (frame, mask) in enumerate(zip(frames, masks)):
        path = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path, quality=95)
        write_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
    val = root / "ImageSets" / "2017" / "val.txt"
    val.parent.mkdir(parents=True, exist_ok=True)
    with val.open("a") as handle:
        handle.write(f"{name}\n")


def test_evaluate_shifted_results(tmp_path):
    root, results = tmp_path / "davis", tmp_path / "results"
    shape, n = (40, 50), 6
    masks = []
    for t in range(n):
        mask = np.zeros(shape, np.uint8)
        mask[10:20, 5 + 3 * t: 15 + 3 * t] = 1  # object 1: 10x10, moving right
        mask[25:35, 30:40] = 2  # object 2: static
        mask[0, :] = VOID_ID  # a void row
        masks.append(mask)
    _write_layout(root, "toy", [np.zeros((*shape, 3), np.uint8)] * n, masks)
    for t, mask in enumerate(masks):
        pred = np.zeros(shape, np.uint8)
        pred[10:20, 7 + 3 * t: 17 + 3 * t] = 1  # object 1 shifted by 2 pixels
        pred[0, :] = 2  # object 2 predicted only in the void row, missed elsewhere
        if t in (0, n - 1):
            pred[:] = 1  # first and last frames are not scored
        write_indexed_png(results / "toy" / f"{t:05d}.png", pred)
    metrics = evaluate(root, results, ["toy"], exclude_void=True)
    j1 = 10 * 8 / (10 * 12)
    radius = boundary_radius(shape)
    f1 = _brute_force_f(masks[1] == 1, np.roll(masks[1] == 1, 2, axis=1), radius)
    # object 2: J = 0 (void row excluded), F = 0 (no predicted boundary outside the void)
    assert metrics["J-Mean"] == pytest.approx(100 * (j1 + 0) / 2)
    assert metrics["F-Mean"] == pytest.approx(100 * (f1 + 0) / 2)
    assert metrics["J&F-Mean"] == pytest.approx((metrics["J-Mean"] + metrics["F-Mean"]) / 2)
    assert metrics["J-Recall"] == pytest.approx(50.0)  # object 1 always > 0.5, object 2 never
    assert metrics["J-Decay"] == pytest.approx(0.0)
    assert metrics["n_objects"] == 2 and metrics["n_sequences"] == 1
    # the default, the toolkit's effective behaviour (void as background)
    loose = evaluate(root, results, ["toy"])
    assert loose["J-Mean"] == pytest.approx(100 * (j1 + 0.0) / 2)  # gt==2 and pred==2 are disjoint
    # an id above the number of objects, or a missing frame, names the file
    bad = np.zeros(shape, np.uint8)
    bad[5, 5] = 3
    write_indexed_png(results / "toy" / "00002.png", bad)
    with pytest.raises(DavisLayoutError, match="00002.png.*object id 3"):
        evaluate(root, results, ["toy"])
    (results / "toy" / "00002.png").unlink()
    with pytest.raises(DavisLayoutError, match="00002.png"):
        evaluate(root, results, ["toy"])


def test_evaluate_decay_over_frames(tmp_path):
    root, results = tmp_path / "davis", tmp_path / "results"
    shape, n = (30, 30), 10
    gt = np.zeros(shape, np.uint8)
    gt[5:15, 5:15] = 1
    _write_layout(root, "decay", [np.zeros((*shape, 3), np.uint8)] * n, [gt] * n)
    js = []
    for t in range(n):
        pred = np.zeros(shape, np.uint8)
        pred[5:15, 5 + t: 15 + t] = 1
        js.append(10 * (10 - t) / (10 * (10 + t)))
        write_indexed_png(results / "decay" / f"{t:05d}.png", pred)
    per_frame = np.array(js[1:-1])  # 8 evaluated frames: edges [0, 2, 4, 5, 7]
    metrics = evaluate(root, results, ["decay"])
    assert metrics["J-Mean"] == pytest.approx(100 * per_frame.mean())
    assert metrics["J-Decay"] == pytest.approx(100 * (per_frame[0:3].mean() - per_frame[5:8].mean()))
    assert metrics["J-Recall"] == pytest.approx(100 * np.mean(per_frame > 0.5))


# ---------------------------------------------------------------------------------------------
# label propagation


def _reference_propagation(target, sources, labels, grid, radius, topk, temperature):
    """The reference's label_propagation written out densely: full (h·w)² neighbourhood mask,
    affinity over every context frame, top-k per target column, normalised columns."""
    h, w = grid
    n = sources.shape[0]
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(h):
                for q in range(w):
                    if radius == 0 or (abs(i - p) <= radius and abs(j - q) <= radius):
                        mask[i, j, p, q] = 1
    mask = mask.reshape(h * w, h * w)
    aff = torch.exp(torch.bmm(target[None].repeat(n, 1, 1), sources.transpose(1, 2)) / temperature)
    aff = aff * mask[None]  # (n, targets, sources)
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # (n·sources, targets)
    kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    c = labels.shape[1]
    segs = labels.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T
    return (segs @ aff).reshape(c, h, w)


@pytest.mark.parametrize("radius,topk", [(2, 5), (0, 5), (1, 3), (12, 7)])
def test_propagate_labels_matches_the_dense_reference(radius, topk, monkeypatch):
    torch.manual_seed(0)
    grid, n, dim, channels = (5, 7), 3, 8, 3
    target = F.normalize(torch.randn(35, dim), dim=1)
    sources = F.normalize(torch.randn(n, 35, dim), dim=1)
    labels = torch.rand(n, channels, *grid)
    expected = _reference_propagation(target, sources, labels, grid, radius, topk, 0.1)
    got = propagate_labels(target, sources, labels, grid, radius, topk, 0.1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(prop, "AFFINITY_BUDGET", 1)  # one target row per chunk
    torch.testing.assert_close(propagate_labels(target, sources, labels, grid, radius, topk, 0.1), expected,
                               rtol=1e-5, atol=1e-6)


def test_resized_frame_size_as_the_reference():
    assert prop.resized_frame_size(480, 854) == (480, 832)  # DAVIS 480p landscape
    assert prop.resized_frame_size(854, 480) == (832, 480)  # portrait
    assert prop.resized_frame_size(96, 128, 96, 32) == (96, 128)
    assert prop.resized_frame_size(100, 100, 480, 64) == (480, 448)  # square: the landscape branch


class OneHotColourBackbone(torch.nn.Module):
    """A stand-in ViT whose patch tokens are the one-hot of the patch's dominant colour channel
    (red: background, green: object 1, blue: object 2), so features identify objects exactly."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        means = F.avg_pool2d(x, self.patch_size)  # (B, 3, h, w)
        tokens = F.one_hot(means.argmax(dim=1).flatten(1), 3).float()  # (B, h·w, 3)
        cls = torch.zeros(tokens.shape[0], 1, 3)
        return [torch.cat([cls, tokens], dim=1)]


def _moving_objects(height: int, width: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames painted by label (red / green / blue) with two objects moving 4 pixels a frame."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    frames, masks = [], []
    for t in range(n):
        mask = np.zeros((height, width), np.uint8)
        mask[4:16, 4 + 4 * t: 16 + 4 * t] = 1  # 12x12 square (3x3 patches of 4), moving right
        mask[((yy - 24) / 5.0) ** 2 + ((xx - 40 + 4 * t) / 6.0) ** 2 <= 1] = 2  # ellipse, moving left
        masks.append(mask)
        frames.append(colours[mask])
    return frames, masks


def test_propagation_with_object_identifying_features_reproduces_the_truth(tmp_path):
    # patch size 1: the soft labels live on the pixel grid, so the masks must come back exactly
    frames, masks = _moving_objects(32, 48, 7)
    settings = PropagationSettings(short_side=32, long_side_multiple=16)
    predicted = list(segment_sequence(OneHotColourBackbone(1), iter(frames), masks[0], settings))
    assert len(predicted) == len(frames) - 1
    for t, pred in enumerate(predicted, start=1):
        np.testing.assert_array_equal(pred, masks[t], err_msg=f"frame {t}")
    root, results = tmp_path / "davis", tmp_path / "results"
    _write_layout(root, "onehot", frames, masks)
    for t, mask in enumerate([masks[0], *predicted]):
        write_indexed_png(results / "onehot" / f"{t:05d}.png", mask)
    metrics = evaluate(root, results, ["onehot"])
    assert metrics["J&F-Mean"] == 100.0 and metrics["J-Mean"] == 100.0 and metrics["F-Mean"] == 100.0


def test_propagation_with_patches_is_exact_on_the_patch_grid():
    # patch size 4: every patch whose pixels share one label is labelled right (its centre pixel);
    # only pixels near patch corners of an object can flip in the bilinear upsampling
    frames, masks = _moving_objects(32, 48, 7)
    settings = PropagationSettings(short_side=32, long_side_multiple=16)
    predicted = list(segment_sequence(OneHotColourBackbone(4), iter(frames), masks[0], settings))
    for t, pred in enumerate(predicted, start=1):
        square = masks[t] == 1  # patch-aligned: its 9 patch centres and the whole interior
        centres = pred[2::4, 2::4]
        np.testing.assert_array_equal(centres == 1, square[2::4, 2::4], err_msg=f"frame {t}")
        assert region_similarity(square, pred == 1) >= (144 - 4) / 144  # at most the 4 corner pixels


def test_first_frame_labels_downsample_like_pil_nearest():
    mask = np.zeros((8, 12), np.uint8)
    mask[0:4, 0:4] = 1
    mask[4:8, 8:12] = 2
    mask[0, 11] = VOID_ID
    labels = prop.first_frame_labels(mask, (2, 3), 3)
    assert labels.shape == (3, 2, 3)
    expected = np.array([[1, 0, 0], [0, 0, 2]])
    np.testing.assert_array_equal(labels.argmax(0).numpy(), expected)
    assert torch.all(labels.sum(0) == 1)


# ---------------------------------------------------------------------------------------------
# fixture and stage


@pytest.fixture(scope="module")
def davis_fixture(tmp_path_factory) -> Path:
    from stages.fixtures.davis import make_fixture

    return make_fixture(tmp_path_factory.mktemp("davis") / "fixture")


def test_fixture_layout_and_ground_truth_scores_100(davis_fixture, tmp_path):
    names = read_sequence_names(davis_fixture)
    assert len(names) == 3
    objects = []
    for name in names:
        frames = sorted((davis_fixture / "JPEGImages" / "480p" / name).glob("*.jpg"))
        annots = sorted((davis_fixture / "Annotations" / "480p" / name).glob("*.png"))
        assert [p.stem for p in frames] == [p.stem for p in annots] and len(frames) == 8
        first = read_mask(annots[0])
        assert first.shape == (96, 128) and VOID_ID not in first
        objects.append(int(first.max()))
        later = read_mask(annots[3])
        assert VOID_ID in later  # void band at object borders
        with Image.open(frames[0]) as image:
            assert image.size == (128, 96) and image.mode == "RGB"
        # the ground truth as results (void -> background) scores 100
        for path in annots:
            mask = read_mask(path)
            write_indexed_png(tmp_path / name / path.name, np.where(mask == VOID_ID, 0, mask))
    assert 1 in objects and 2 in objects
    metrics = evaluate(davis_fixture, tmp_path, names)
    assert metrics["J&F-Mean"] == 100.0 and metrics["n_objects"] == sum(objects)


def test_fixture_is_deterministic(tmp_path):
    from stages.fixtures.davis import SEQUENCES, make_fixture

    a = make_fixture(tmp_path / "a", SEQUENCES[:1], frames=3, size=(48, 64))
    b = make_fixture(tmp_path / "b", SEQUENCES[:1], frames=3, size=(48, 64))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 7  # 3 frames + 3 masks + val.txt
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _stage_params(tmp: Path, fixture: Path, **davis) -> dict:
    params = tiny_params(tmp)
    params["davis"] = {"root": None, "fixture": str(fixture), "results": str(tmp / "results/davis"),
                       "short_side": 64, "long_side_multiple": 16, "device": "cpu", **davis}
    return params


def test_stage_end_to_end_on_the_fixture(davis_fixture, tmp_path):
    from stages.davis import main

    params = _stage_params(tmp_path, tmp_path / "fixture")  # root null: the stage writes the fixture
    save_random_teacher(validate_params(params))
    params_file = write_params(tmp_path / "params.yaml", params)
    assert main(["--params", str(params_file)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "davis.json").read_text())
    keys = {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay", "n_sequences", "n_objects"}
    assert set(metrics) == keys
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["J-Mean"] <= 100 and 0 <= metrics["F-Mean"] <= 100
    assert metrics["J&F-Mean"] == pytest.approx((metrics["J-Mean"] + metrics["F-Mean"]) / 2)
    assert metrics["n_sequences"] == 3
    # a random ViT still tracks the textured cut-outs better than nothing
    assert metrics["J-Mean"] > 20
    results = tmp_path / "results" / "davis"
    for name in read_sequence_names(davis_fixture):
        written = sorted((results / name).glob("*.png"))
        assert [p.stem for p in written] == [f"{t:05d}" for t in range(8)]
        with Image.open(written[2]) as image:
            assert image.mode == "P" and image.size == (128, 96)
        first = read_mask(davis_fixture / "Annotations" / "480p" / name / "00000.png")
        np.testing.assert_array_equal(read_mask(written[0]), first)
        regenerated = tmp_path / "fixture" / "JPEGImages" / "480p" / name / "00005.jpg"
        assert regenerated.read_bytes() == (davis_fixture / regenerated.relative_to(tmp_path / "fixture")).read_bytes()
    rows = (tmp_path / "plots" / "davis_per_sequence.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["name", "sequence", "object", "J&F-Mean"]
    assert len(rows) == 1 + metrics["n_objects"]
    table = [dict(zip(rows[0].split(","), row.split(","))) for row in rows[1:]]
    assert {r["name"] for r in table} >= {"coffee-cat_1", "china-duo_2"}
    assert np.mean([float(r["J-Mean"]) for r in table]) == pytest.approx(metrics["J-Mean"], abs=1e-3)
    assert not list(results.parent.glob(".*.tmp"))  # the atomic temp folder is gone


def test_stage_refuses_bad_settings_before_writing(davis_fixture, tmp_path):
    from stages.davis import run

    params = _stage_params(tmp_path, davis_fixture, short_side=90)  # not a multiple of patch 4
    save_random_teacher(validate_params(params))
    with pytest.raises(StageError, match="davis.short_side = 90"):
        run(validate_params(params))
    params = _stage_params(tmp_path, davis_fixture, root=str(tmp_path / "no-davis"))
    with pytest.raises(StageError, match="no-davis: davis.root is not a directory"):
        run(validate_params(params))
    assert not (tmp_path / "results").exists() and not (tmp_path / "metrics").exists()


def test_davis_defaults_are_the_reference():
    davis = validate_params({}).davis
    assert (davis.n_last_frames, davis.size_mask_neighborhood, davis.topk, davis.temperature) == (7, 12, 5, 0.1)
    assert (davis.short_side, davis.long_side_multiple, davis.root) == (480, 64, None)
