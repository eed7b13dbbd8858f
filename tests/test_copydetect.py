"""Copydays copy detection: Holidays-style AP on known rankings, the prefix ground truth, the
descriptor and whitening against hand computations, the fixture and the stage end to end."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny_config import save_random_teacher, tiny_params, write_params
from stages.cli import StageError
from stages.copydetect import (
    Whitening,
    copy_descriptor,
    main,
    mean_ap,
    positives_by_prefix,
    read_copydays,
    run,
    score_ap_from_ranks,
    search,
)
from stages.dino.backbones import build_backbone
from stages.fixtures import write_image_folder
from stages.fixtures.copydays import CROP_PERCENTS, JPEG_QUALITIES, make_fixture
from stages.params import validate_params

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ap_on_known_rankings() -> None:
    # Positives at ranks 0 and 2 of 2: 1/2 (1 + 1)/2 + 1/2 (1/2 + 2/3)/2 = 1/2 + 7/24 = 19/24.
    assert score_ap_from_ranks([0, 2], 2) == pytest.approx(19 / 24)
    # One positive at rank 1: 1 * (0/1 + 1/2)/2 = 1/4.
    assert score_ap_from_ranks([1], 1) == pytest.approx(1 / 4)
    # Three positives, only two retrieved within the top k (ranks 0, 1): 2/3.
    assert score_ap_from_ranks([0, 1], 3) == pytest.approx(2 / 3)
    assert score_ap_from_ranks([], 1) == 0.0
    with pytest.raises(ValueError):
        score_ap_from_ranks([0], 0)
    retrieved = np.array([[5, 0, 1], [2, 3, 4], [1, 9, 0]])
    # query 0: positive {0} at rank 1 -> 1/4; query 1: {3, 4} at 1, 2 -> 1/2 (0 + 1/2)/2 +
    # 1/2 (1/2 + 2/3)/2 = 1/8 + 7/24 = 5/12; query 2: {7} never retrieved -> 0.
    assert mean_ap(retrieved, [[0], [3, 4], [7]]) == pytest.approx((1 / 4 + 5 / 12 + 0) / 3)


def test_positives_share_the_first_four_characters() -> None:
    originals = ["200000.jpg", "200100.jpg", "213400.jpg"]
    queries = ["original/200100.jpg", "strong/200001.jpg", "strong/213403.jpg", "crops/50/200000.jpg"]
    assert positives_by_prefix(queries, originals) == [[1], [0], [2], [0]]


def test_whitening_centred_is_pca_whitening_with_power_half() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 3.0
    white = Whitening.learn(torch.from_numpy(x).float(), centred=True)
    # Independent numpy: covariance of the centred set, eigen-decomposition, scale by eig^-0.5.
    centred = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(x))
    expected = centred @ eigenvectors / np.sqrt(eigenvalues)
    got = white.apply(torch.from_numpy(x).float()).numpy().astype(np.float64)
    order = np.argsort(eigenvalues)[::-1]
    np.testing.assert_allclose(np.abs(got), np.abs(expected[:, order]), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.cov(got.T, bias=True), np.eye(5), atol=1e-3)
    # Fewer samples than dimensions: eigenvalues floored at 1e-5 x the largest, still finite.
    few = Whitening.learn(torch.from_numpy(rng.normal(size=(3, 8))).float())
    assert torch.isfinite(few.projection).all()


def test_whitening_by_default_is_the_references_second_moment_pca() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 2.0
    white = Whitening.learn(torch.from_numpy(x).float())
    # eval_copy_detection.py: subtract the mean, then project on the eigenvectors of the
    # uncentred X^T X / N, each scaled by eigenvalue^-0.5
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(eigenvalues)[::-1]
    expected = (x - x.mean(axis=0)) @ eigenvectors[:, order] / np.sqrt(eigenvalues[order])
    got = white.apply(torch.from_numpy(x).float()).numpy().astype(np.float64)
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-3, atol=1e-3)
    centred = Whitening.learn(torch.from_numpy(x).float(), centred=True).apply(torch.from_numpy(x).float())
    assert not np.allclose(np.abs(got), np.abs(centred.numpy()), atol=1e-2)  # the two differ here


def test_copy_descriptor_is_cls_and_gem4_of_the_last_layer() -> None:
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        got = copy_descriptor(vit, images)
        tokens = vit.get_intermediate_layers(images, 1)[0].numpy()
        cls = vit(images).numpy()
    gem = np.mean(np.clip(tokens[:, 1:], 1e-6, None) ** 4, axis=1) ** 0.25
    assert got.shape == (2, 64)
    np.testing.assert_allclose(got[:, :32].numpy(), cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 32:].numpy(), gem, rtol=1e-4, atol=1e-6)


def test_search_returns_cosine_top_k() -> None:
    database = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    queries = torch.tensor([[0.0, 5.0], [3.0, 0.1]])
    assert search(database, queries, k=2).tolist() == [[1, 2], [0, 2]]
    assert search(database, queries, k=20).shape == (2, 3)


@pytest.fixture(scope="module")
def copydays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("copydays") / "fx")


def test_fixture_is_the_copydays_layout_and_deterministic(copydays: Path, tmp_path: Path) -> None:
    data = read_copydays(copydays)
    assert [p.name for p in data.originals] == [f"{2000 + i}00.jpg" for i in range(6)]
    assert list(data.blocks) == (["original", "strong"] + [f"jpegqual/{q}" for q in JPEG_QUALITIES]
                                 + [f"crops/{c}" for c in CROP_PERCENTS])
    assert len(data.blocks["strong"]) == 15
    for files in data.blocks.values():
        assert all(len(pos) == 1 for pos in positives_by_prefix(files, data.originals))
    with Image.open(data.blocks["crops/50"][0]) as cropped, Image.open(data.originals[0]) as original:
        area = cropped.size[0] * cropped.size[1] / (original.size[0] * original.size[1])
        assert area == pytest.approx(0.5, abs=0.02)
    again = make_fixture(tmp_path / "again")
    for path in sorted(copydays.rglob("*.jpg")):
        assert (again / path.relative_to(copydays)).read_bytes() == path.read_bytes(), path


def _hand_strong_map(vit, root: Path, imsize: int, extra: list[Path]) -> float:
    """strong-block mAP by hand: bicubic square resize, CLS ‖ GeM-4, cosine, top 20, trapezoid AP."""
    def desc(path):
        img = Image.open(path).convert("RGB").resize((imsize, imsize), Image.BICUBIC)
        x = torch.from_numpy(((np.asarray(img, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))[None]
        with torch.no_grad():
            tokens = vit.get_intermediate_layers(x, 1)[0][0].numpy()
        v = np.concatenate([tokens[0], np.mean(np.clip(tokens[1:], 1e-6, None) ** 4, axis=0) ** 0.25])
        return v / np.linalg.norm(v)

    originals = sorted((root / "original").glob("*.jpg"))
    db = np.stack([desc(p) for p in originals + extra])
    total = 0.0
    strong = sorted((root / "strong").glob("*.jpg"))
    for query in strong:
        order = np.argsort(-(db @ desc(query)), kind="stable")[:20]
        ap, found = 0.0, 0
        for rank, index in enumerate(order):
            if index < len(originals) and originals[index].name[:4] == query.name[:4]:
                ap += ((1.0 if rank == 0 else found / rank) + (found + 1) / (rank + 1)) / 2
                found += 1
        total += ap
    return 100 * total / len(strong)


def test_stage_end_to_end_on_the_fixture(tmp_path: Path) -> None:
    distractors = write_image_folder(tmp_path / "distractors", 4, seed=3, prefix="9999")
    raw = tiny_params(tmp_path, copydetect={
        "fixture": str(tmp_path / "fixtures/copydays"), "imsize": 32, "batch_size": 16, "num_workers": 0,
        "device": "cpu", "distractors": str(tmp_path / "distractors"),
    })
    params = validate_params(raw)
    vit = save_random_teacher(params)
    metrics = run(params)
    assert json.loads((tmp_path / "metrics/copydetect.json").read_text()) == metrics
    blocks = ["original", "strong"] + [f"jpegqual_{q}" for q in JPEG_QUALITIES] + [f"crops_{c}" for c in CROP_PERCENTS]
    assert set(metrics) == {f"{b}_mAP" for b in blocks} | {"mAP", "n_database"}
    assert metrics["n_database"] == 6 + 4
    assert metrics["mAP"] == metrics["strong_mAP"]
    assert metrics["original_mAP"] == pytest.approx(100.0)  # each original finds itself first
    assert all(0.0 <= metrics[f"{b}_mAP"] <= 100.0 for b in blocks)
    expected = _hand_strong_map(vit, tmp_path / "fixtures/copydays", 32, distractors)
    assert metrics["strong_mAP"] == pytest.approx(expected, abs=1e-3)


def test_stage_with_whitening_runs_and_keeps_originals_first(tmp_path: Path, copydays: Path) -> None:
    write_image_folder(tmp_path / "white", 10, seed=4)
    raw = tiny_params(tmp_path, copydetect={
        "root": str(copydays), "imsize": 32, "batch_size": 16, "num_workers": 0, "device": "cpu",
        "whitening": str(tmp_path / "white"),
    })
    params = validate_params(raw)
    save_random_teacher(params)
    metrics = run(params)
    assert metrics["original_mAP"] == pytest.approx(100.0)
    assert metrics["n_database"] == 6


def test_bad_layouts_are_named(copydays: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "broken"
    shutil.copytree(copydays, root)
    (root / "strong" / "200099.jpg").write_bytes((root / "strong" / "200001.jpg").read_bytes())
    (root / "strong" / "777701.jpg").write_bytes((root / "strong" / "200001.jpg").read_bytes())
    with pytest.raises(StageError, match="777701.jpg"):
        read_copydays(root)
    shutil.rmtree(root / "strong")
    with pytest.raises(StageError, match=f"{root / 'strong'}: missing"):
        read_copydays(root)
    raw = tiny_params(tmp_path, copydetect={"root": str(root), "imsize": 32})
    params_file = write_params(tmp_path / "params.yaml", raw)
    with caplog.at_level(logging.ERROR):
        assert main(["--params", str(params_file)]) == 1
    assert f"{root / 'strong'}: missing" in caplog.text
    raw = tiny_params(tmp_path, copydetect={"root": str(copydays), "imsize": 30})
    with pytest.raises(StageError, match="copydetect.imsize = 30 is not a multiple of model.patch_size = 4"):
        run(validate_params(raw))
