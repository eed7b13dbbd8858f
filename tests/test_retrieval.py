"""Revisited Oxford/Paris retrieval: revisitop's scoring against hand-computed cases, the layout
reader, features, the fixture generator and the stage end to end."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tiny_config import save_random_teacher, tiny_params, write_params
from stages.cli import StageError
from stages.dino.backbones import build_backbone
from stages.fixtures import bundled_photo
from stages.fixtures.retrieval import make_fixture, write_revisited
from stages.params import validate_params
from stages.retrieval import (
    compute_map,
    evaluate_dataset,
    image_features,
    load_revisited,
    main,
    protocol_gnd,
    retrieval_image,
    run,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ scoring


def test_compute_map_hand_computed_with_junk_and_an_empty_query() -> None:
    # Query 0: ranking 3, 0, 5, 1, 2, 4; ok = {0, 1}; junk = {5}.
    #   positions 1 (img 0) and 3 (img 1); the junk at position 2 is removed -> 1 and 2.
    #   AP = 1/2 * (0/1 + 1/2)/2 + 1/2 * (1/2 + 2/3)/2 = 1/8 + 7/24 = 5/12.
    #   1-based positions 2, 3: P@1 = 0/1; P@5: kq = min(3, 5) = 3 -> 2/3; P@10 likewise 2/3.
    # Query 1: no positives -> NaN, left out of the means.
    # Query 2: ranking 4, 2, ...; ok = {4} -> AP = 1, P@1 = P@5 = P@10 = 1 (kq = 1).
    # Query 3: ranking 2, 3, 0, 1, 4, 5; ok = {0, 4}, junk = {2, 3}: positions 2, 4 -> 0, 2
    #   after removing the two junk images before them (image 1 is a plain negative):
    #   AP = 1/2 * (1 + 1)/2 + 1/2 * (1/2 + 2/3)/2 = 1/2 + 7/24 = 19/24;
    #   1-based 1, 3: P@1 = 1; P@5: kq = 3 -> 2/3; P@10: 2/3.
    ranks = np.array([
        [3, 0, 4, 2],
        [0, 1, 2, 3],
        [5, 2, 0, 0],
        [1, 3, 1, 1],
        [2, 4, 3, 4],
        [4, 5, 5, 5],
    ])
    gnd = [
        {"ok": [0, 1], "junk": [5]},
        {"ok": [], "junk": [0]},
        {"ok": [4], "junk": []},
        {"ok": [0, 4], "junk": [2, 3]},
    ]
    mean_ap, aps, mean_pr, prs = compute_map(ranks, gnd, kappas=(1, 5, 10))
    assert aps[0] == pytest.approx(5 / 12)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert aps[2] == pytest.approx(1.0) and aps[3] == pytest.approx(19 / 24)
    np.testing.assert_allclose(prs[0], [0.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prs[2], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(prs[3], [1.0, 2 / 3, 2 / 3])
    assert mean_ap == pytest.approx((5 / 12 + 1 + 19 / 24) / 3)
    np.testing.assert_allclose(mean_pr, [(0 + 1 + 1) / 3, (2 / 3 + 1 + 2 / 3) / 3, (2 / 3 + 1 + 2 / 3) / 3])


def test_compute_map_positive_after_negatives_and_precision_at_k() -> None:
    # Ranking 7, 8, 0, 9, 1, 2, 3, 4, 5, 6 with ok = {0, 1, 2}: positions 2, 4, 5.
    #   AP = 1/3 [(0/2 + 1/3)/2 + (1/4 + 2/5)/2 + (2/5 + 3/6)/2] = 1/3 [1/6 + 13/40 + 9/20] = 113/360.
    #   1-based 3, 5, 6: P@1 = 0; P@5 = 2/5; P@10: kq = min(6, 10) = 6 -> 3/6.
    ranks = np.array([7, 8, 0, 9, 1, 2, 3, 4, 5, 6])[:, None]
    mean_ap, aps, mean_pr, _ = compute_map(ranks, [{"ok": [0, 1, 2], "junk": []}], kappas=(1, 5, 10))
    assert mean_ap == pytest.approx(113 / 360)
    np.testing.assert_allclose(mean_pr, [0.0, 2 / 5, 1 / 2])


def test_compute_map_all_queries_empty_is_nan_and_bad_shapes_raise() -> None:
    mean_ap, aps, mean_pr, _ = compute_map(np.arange(3)[:, None], [{"ok": []}], kappas=(1,))
    assert math.isnan(mean_ap) and math.isnan(aps[0]) and np.isnan(mean_pr).all()
    with pytest.raises(ValueError, match="n_queries"):
        compute_map(np.zeros((3, 2), dtype=int), [{"ok": [0]}])


def _ap_by_filtering(column: list[int], ok: set[int], junk: set[int]) -> float:
    """Independent AP: build the ranked list without junk, then add trapezoids over recall."""
    kept = [x for x in column if x not in junk]
    ap, found = 0.0, 0
    for position, image in enumerate(kept):
        if image in ok:
            before = 1.0 if position == 0 else found / position
            found += 1
            after = found / (position + 1)
            ap += (before + after) / 2 / len(ok)
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_compute_map_matches_an_independent_loop_on_random_rankings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_db, n_q = 30, 6
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd, expected = [], []
    for j in range(n_q):
        images = rng.permutation(n_db)
        ok = set(images[: rng.integers(1, 6)].tolist())
        junk = set(images[10: 10 + rng.integers(0, 6)].tolist())
        gnd.append({"ok": sorted(ok), "junk": sorted(junk)})
        expected.append(_ap_by_filtering(ranks[:, j].tolist(), ok, junk))
    mean_ap, aps, _, _ = compute_map(ranks, gnd)
    np.testing.assert_allclose(aps, expected)
    assert mean_ap == pytest.approx(np.mean(expected))


def test_protocols_are_revisitops() -> None:
    gnd = [{"easy": [1, 2], "hard": [3], "junk": [4]}]
    medium, hard = protocol_gnd(gnd, "medium")[0], protocol_gnd(gnd, "hard")[0]
    assert medium["ok"].tolist() == [1, 2, 3] and medium["junk"].tolist() == [4]
    assert hard["ok"].tolist() == [3] and sorted(hard["junk"].tolist()) == [1, 2, 4]
    with pytest.raises(ValueError, match="medium"):
        protocol_gnd(gnd, "extreme")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ features


class PixelModel(nn.Module):
    """The identity "model": features are the image's pixels averaged down to 6x6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, (6, 6)).flatten(1)


def _exact_copies(root: Path) -> Path:
    """A dataset whose positives are byte-identical copies of the queries (easy and hard)."""
    queries = ["astronaut", "chelsea", "coffee"]
    images, imlist = {}, []
    for name in queries:
        images[f"{name}_q"] = images[f"{name}_a"] = images[f"{name}_b"] = bundled_photo(name, 64)
    for name in ["rocket", "camera", "coins", "brick", "page"]:
        images[f"{name}_n"] = bundled_photo(name, 64)
    imlist = ["rocket_n", "coffee_b", "astronaut_a", "camera_n", "chelsea_b", "coins_n", "coffee_a",
              "brick_n", "astronaut_b", "chelsea_a", "page_n"]
    gnd = [{"bbx": [0, 0, 32, 32], "easy": [imlist.index(f"{q}_a")], "hard": [imlist.index(f"{q}_b")],
            "junk": []} for q in queries]
    return write_revisited(root, "roxford5k", images, imlist, [f"{q}_q" for q in queries], gnd).parent


def test_identity_model_retrieves_exact_copies_perfectly(tmp_path: Path) -> None:
    root = _exact_copies(tmp_path)
    dataset = load_revisited(root, "roxford5k")
    metrics = evaluate_dataset(PixelModel(), dataset, imsize=48)
    for protocol in "MH":
        assert metrics[f"roxford5k_{protocol}_mAP"] == pytest.approx(100.0)
        assert metrics[f"roxford5k_{protocol}_mP@1"] == pytest.approx(100.0)
    # Medium: both copies are positives, so precision at 5 is normalised by kq = 2.
    assert metrics["roxford5k_M_mP@5"] == pytest.approx(100.0)
    assert metrics["roxford5k_n_database"] == 11 and metrics["roxford5k_n_queries"] == 3


def _reference_pixels(path: Path, imsize: int, bbx=None) -> np.ndarray:
    """The reference's input by hand: PIL thumbnail (LANCZOS), /255, ImageNet normalisation."""
    img = Image.open(path).convert("RGB")
    if bbx is not None:
        img = img.crop(tuple(bbx))
    img.thumbnail((imsize, imsize), Image.LANCZOS)
    return ((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_retrieval_image_is_the_references_thumbnail_and_bbx_crop(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    bundled_photo("chelsea", 120).save(path)  # 120 x 80
    full = retrieval_image(path, 60)
    assert tuple(full.shape) == (3, 40, 60)
    np.testing.assert_allclose(full.numpy(), _reference_pixels(path, 60), atol=1e-5)
    cropped = retrieval_image(path, 60, (10.0, 20.0, 50.0, 70.0))
    assert tuple(cropped.shape) == (3, 50, 40)  # 40 x 50 box, already within 60
    np.testing.assert_allclose(cropped.numpy(), _reference_pixels(path, 60, (10, 20, 50, 70)), atol=1e-5)


def test_image_features_single_and_multiscale_match_hand_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path / "x.jpg"
    bundled_photo("coffee", 90).save(path)  # 90 x 60 -> thumbnail 30 x 20 at imsize 30
    x = torch.from_numpy(_reference_pixels(path, 30))[None]
    with torch.no_grad():
        single = F.normalize(vit(x[..., :20, :28]), dim=1)  # cut to multiples of the patch (4)
        total = 0
        for scale in (1.0, 1 / math.sqrt(2), 0.5):
            inp = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            h, w = inp.shape[-2] // 4 * 4, inp.shape[-1] // 4 * 4
            total = total + vit(inp[..., :h, :w])
        multi = F.normalize(total / 3, dim=1)
    got = image_features(vit, [path], 30)
    got_multi = image_features(vit, [path], 30, multiscale=True)
    torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_multi, multi, atol=1e-5, rtol=1e-5)


def test_an_image_too_small_for_the_half_scale_is_named(tmp_path: Path) -> None:
    vit = build_backbone("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path / "narrow.png"
    Image.new("RGB", (90, 18), (120, 60, 30)).save(path)  # thumbnail at imsize 30: 30 x 6
    assert image_features(vit, [path], 30).shape == (1, 32)  # 6 px hold one 4-px patch
    with pytest.raises(StageError, match=r"narrow.png: 30x6 .* patch size 4 \(at scale 0.5"):
        image_features(vit, [path], 30, multiscale=True)  # 3 px at half scale do not


# ------------------------------------------------------------------------------------ fixture


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("revisitop") / "fx")


def test_fixture_is_the_revisitop_layout_and_deterministic(fixture_root: Path, tmp_path: Path) -> None:
    for name in ("roxford5k", "rparis6k"):
        data = load_revisited(fixture_root, name, need_bbx=True)
        assert len(data.qimlist) == 3 and len(data.imlist) == 22
        for query in data.gnd:
            easy, hard, junk = set(query["easy"]), set(query["hard"]), set(query["junk"])
            assert easy and hard and junk and not (easy & hard or easy & junk or hard & junk)
        with Image.open(data.query_paths[0]) as img:
            assert max(img.size) <= 192
            x1, y1, x2, y2 = data.gnd[0]["bbx"]
            assert 0 <= x1 < x2 <= img.size[0] and 0 <= y1 < y2 <= img.size[1]
    again = make_fixture(tmp_path / "again", datasets=("roxford5k",))
    for path in sorted((fixture_root / "roxford5k").rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(fixture_root)).read_bytes() == path.read_bytes(), path


# ------------------------------------------------------------------------------------ stage


def _hand_metrics(vit: nn.Module, root: Path, name: str, imsize: int, extra: list[Path]) -> dict[str, float]:
    """The stage's numbers recomputed by hand: reference inputs, CLS, cosine, revisitop scores."""
    with open(root / name / f"gnd_{name}.pkl", "rb") as handle:
        cfg = pickle.load(handle)

    def feats(paths):
        rows = []
        for path in paths:
            x = torch.from_numpy(_reference_pixels(path, imsize))[None]
            h, w = x.shape[-2] // 4 * 4, x.shape[-1] // 4 * 4
            with torch.no_grad():
                rows.append(F.normalize(vit(x[..., :h, :w]), dim=1)[0].numpy())
        return np.stack(rows)

    db = feats([root / name / "jpg" / f"{n}.jpg" for n in cfg["imlist"]] + extra)
    q = feats([root / name / "jpg" / f"{n}.jpg" for n in cfg["qimlist"]])
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    out = {}
    for short, ok_keys, junk_keys in (("M", ("easy", "hard"), ("junk",)), ("H", ("hard",), ("junk", "easy"))):
        gnd = [{"ok": sum((list(g[k]) for k in ok_keys), []), "junk": sum((list(g[k]) for k in junk_keys), [])}
               for g in cfg["gnd"]]
        aps = [_ap_by_filtering(ranks[:, j].tolist(), set(g["ok"]), set(g["junk"])) for j, g in enumerate(gnd)]
        out[f"{name}_{short}_mAP"] = 100 * float(np.mean(aps))
    return out


def test_stage_end_to_end_on_the_fixture_with_distractors(tmp_path: Path) -> None:
    from stages.fixtures import write_image_folder

    distractors = write_image_folder(tmp_path / "distractors", 3, seed=5)
    raw = tiny_params(tmp_path, retrieval={
        "fixture": str(tmp_path / "fixtures/revisitop"), "imsize": 32, "num_workers": 0, "device": "cpu",
        "distractors": str(tmp_path / "distractors"),
    })
    params = validate_params(raw)
    vit = save_random_teacher(params)
    metrics = run(params)
    written = json.loads((tmp_path / "metrics/retrieval.json").read_text())
    assert written == metrics
    for name in ("roxford5k", "rparis6k"):
        assert (tmp_path / "fixtures/revisitop" / name / f"gnd_{name}.pkl").is_file()
        for key in ("M_mAP", "H_mAP", "M_mP@1", "M_mP@5", "M_mP@10", "H_mP@1", "H_mP@5", "H_mP@10"):
            assert 0.0 <= metrics[f"{name}_{key}"] <= 100.0
        assert metrics[f"{name}_n_database"] == 22 + 3
        expected = _hand_metrics(vit, tmp_path / "fixtures/revisitop", name, 32, distractors)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-3), key
    assert metrics["n_distractors"] == 3


def test_missing_image_and_missing_pickle_are_named(fixture_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(fixture_root, root)
    victim = sorted((root / "roxford5k" / "jpg").glob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(StageError, match=f"missing: {victim}"):
        load_revisited(root, "roxford5k")
    (root / "rparis6k" / "gnd_rparis6k.pkl").unlink()
    with pytest.raises(StageError, match="gnd_rparis6k.pkl: missing"):
        load_revisited(root, "rparis6k")
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "rb") as handle:
        cfg = pickle.load(handle)
    for query in cfg["gnd"]:
        del query["bbx"]
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump(cfg, handle)
    with pytest.raises(StageError, match=r"lacks bbx \(needed by retrieval.crop_queries"):
        load_revisited(root, "roxford5k", need_bbx=True)


def test_cli_exits_1_naming_the_missing_file_before_any_work(tmp_path: Path, caplog) -> None:
    raw = tiny_params(tmp_path, retrieval={"root": str(tmp_path / "data"), "datasets": ["roxford5k"]})
    (tmp_path / "data").mkdir()
    params_file = write_params(tmp_path / "params.yaml", raw)
    with caplog.at_level(logging.ERROR):
        assert main(["--params", str(params_file)]) == 1
    assert f"{tmp_path / 'data' / 'roxford5k' / 'gnd_roxford5k.pkl'}: missing" in caplog.text
    assert not (tmp_path / "metrics").exists()
