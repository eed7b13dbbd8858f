"""Weighted k-NN (paper Appendix F.1) against a brute-force loop written here, and the knn stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.cli import StageError
from stages.features import FeaturesError, write_features
from stages.knn import knn_classify, knn_classify_multi
from stages.knn import run as knn_run
from stages.params import validate_params
from tests.conftest import tiny_params


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Plain loops: cosine similarity to every training sample, the k most similar vote
    exp(sim / T) for their class; ties between classes go to the lower index."""
    top1 = top5 = 0
    for q, y in zip(test_x, test_y):
        qn = q / np.linalg.norm(q)
        sims = []
        for j, t in enumerate(train_x):
            sims.append((float(np.dot(qn, t / np.linalg.norm(t))), j))
        sims.sort(key=lambda s: (-s[0], s[1]))
        scores = [0.0] * num_classes
        for sim, j in sims[: min(k, len(train_x))]:
            scores[int(train_y[j])] += math.exp(sim / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranking[0] == y
        top5 += y in ranking[: min(5, num_classes)]
    n = len(test_y)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def clustered(rng, n, dim, num_classes, noise):
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, size=n)
    return (centers[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.mark.parametrize(
    "num_classes,n_train,n_test,dim,noise",
    [(10, 200, 60, 16, 1.5), (3, 90, 25, 8, 1.0), (7, 50, 1, 5, 0.8)],
)
def test_matches_brute_force_for_several_k_and_t(num_classes, n_train, n_test, dim, noise):
    rng = np.random.default_rng(num_classes)
    train_x, train_y = clustered(rng, n_train + n_test, dim, num_classes, noise)
    test_x, test_y = train_x[n_train:], train_y[n_train:]
    train_x, train_y = train_x[:n_train], train_y[:n_train]
    ks = (1, 3, 10, 20)
    for temperature in (0.07, 0.5):
        got = knn_classify_multi(train_x, train_y, test_x, test_y, ks, temperature, num_classes, chunk_size=7)
        for k in ks:
            want = brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes)
            assert got[k] == pytest.approx(want), (k, temperature)
            single = knn_classify(train_x, train_y, test_x, test_y, k, temperature, num_classes)
            assert single == pytest.approx(want)


def test_results_are_not_trivial_and_chunking_is_invisible():
    rng = np.random.default_rng(1)
    x, y = clustered(rng, 700, 12, 10, 2.0)
    full = knn_classify_multi(x[:500], y[:500], x[500:], y[500:], (5, 20), 0.07, chunk_size=10_000)
    chunked = knn_classify_multi(x[:500], y[:500], x[500:], y[500:], (5, 20), 0.07, chunk_size=13)
    assert full == chunked
    assert 30 < full[20]["top1"] < 100  # far above 10% chance, below perfect
    assert full[20]["top5"] >= full[20]["top1"]


def test_hand_computed_case():
    # Train points on the unit circle; the query (1, 0.2) is most similar to the class-0 points
    # at 0 and 20 degrees, then to class 1 at 45 degrees, then class 1 at 90 degrees.
    deg = np.deg2rad([0.0, 20.0, 45.0, 90.0, 180.0])
    train_x = np.stack([np.cos(deg), np.sin(deg)], axis=1) * np.array([[2.0], [1.0], [3.0], [1.0], [5.0]])
    train_y = np.array([0, 0, 1, 1, 2])
    query = np.array([[1.0, 0.2]])
    # k = 1: the nearest is class 0.
    assert knn_classify(train_x, train_y, query, np.array([0]), k=1) == {"top1": 100.0, "top5": 100.0}
    # k = 3 with a huge temperature: weights ~ equal, class 0 has two votes, class 1 one.
    assert knn_classify(train_x, train_y, query, np.array([1]), k=3, temperature=1e6)["top1"] == 0.0
    # Class 1 wins with k = 4 once its two votes outweigh class 0's: compute the weights by hand.
    q = query[0] / np.linalg.norm(query[0])
    cos = lambda a: float(np.dot(q, [np.cos(a), np.sin(a)]))
    t = 0.07
    s0 = math.exp(cos(deg[0]) / t) + math.exp(cos(deg[1]) / t)
    s1 = math.exp(cos(deg[2]) / t) + math.exp(cos(deg[3]) / t)
    expected = 0 if s0 > s1 else 1
    got = knn_classify(train_x, train_y, query, np.array([expected]), k=4, temperature=t)
    assert got["top1"] == 100.0
    # Fewer than 5 classes: top-5 is top-C, always 100%.
    assert knn_classify(train_x, train_y, query, np.array([2]), k=1)["top5"] == 100.0
    assert knn_classify(train_x, train_y, query, np.array([2]), k=1)["top1"] == 0.0


def test_class_ties_go_to_the_lower_index():
    train_x = np.array([[1.0, 1.0], [1.0, -1.0]])  # equally similar to the query (1, 0)
    train_y = np.array([3, 1])
    query = np.array([[1.0, 0.0]])
    assert knn_classify(train_x, train_y, query, np.array([1]), k=2)["top1"] == 100.0
    assert knn_classify(train_x, train_y, query, np.array([3]), k=2)["top1"] == 0.0


def test_top5_with_many_classes_counts_five_ranks():
    # 8 classes, one training point each, at decreasing similarity to the query.
    angles = np.deg2rad(np.arange(8) * 10.0)
    train_x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    train_y = np.arange(8)
    query = np.array([[1.0, 0.0]] * 8)
    got = knn_classify(train_x, train_y, query, np.arange(8), k=8)
    assert got["top1"] == pytest.approx(100.0 / 8)
    assert got["top5"] == pytest.approx(500.0 / 8)


def test_single_query_and_torch_inputs():
    rng = np.random.default_rng(3)
    x, y = clustered(rng, 41, 6, 4, 0.5)
    as_numpy = knn_classify(x[:40], y[:40], x[40:], y[40:], k=5)
    as_torch = knn_classify(torch.from_numpy(x[:40]), torch.from_numpy(y[:40]), torch.from_numpy(x[40:]),
                            torch.from_numpy(y[40:]), k=5)
    assert as_numpy == as_torch
    assert as_numpy == brute_force_knn(x[:40], y[:40], x[40:], y[40:], 5, 0.07, 4)


def test_k_larger_than_train_is_clamped(caplog):
    rng = np.random.default_rng(4)
    x, y = clustered(rng, 30, 4, 3, 1.0)
    with caplog.at_level("WARNING"):
        big = knn_classify_multi(x[:12], y[:12], x[12:], y[12:], (200,), 0.07)[200]
    assert "exceeds the 12 training samples" in caplog.text
    assert big == knn_classify(x[:12], y[:12], x[12:], y[12:], k=12)
    assert big == pytest.approx(brute_force_knn(x[:12], y[:12], x[12:], y[12:], 12, 0.07, 3))


def test_bad_inputs_raise_clear_errors():
    x, y = np.ones((5, 4)), np.zeros(5, dtype=int)
    with pytest.raises(ValueError, match="train_features has D = 4, test_features has D = 3"):
        knn_classify(x, y, np.ones((2, 3)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"train_labels has shape \(4,\), expected \(5,\)"):
        knn_classify(x, y[:4], x, y)
    with pytest.raises(ValueError, match="out of range for num_classes = 2"):
        knn_classify(x, np.array([0, 1, 2, 0, 1]), x, y, num_classes=2)
    with pytest.raises(ValueError, match="non-finite"):
        knn_classify(x, y, np.full((1, 4), np.nan), y[:1])
    with pytest.raises(ValueError, match="positive"):
        knn_classify(x, y, x, y, k=0)


def _write_split(root: Path, split: str, feats: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    keys = [f"{split}{i:05d}" for i in range(len(labels))]
    write_features(root / split, feats, labels, keys, {"pooling": "cls", "num_classes": num_classes})


def test_stage_writes_flat_metrics(tmp_path):
    params = validate_params(tiny_params(tmp_path, knn={"k": [1, 5, 50], "baselines": False}))
    rng = np.random.default_rng(5)
    x, y = clustered(rng, 120, 8, 5, 1.0)
    features = Path(params.paths.features)
    _write_split(features, "train", x[:90], y[:90], 5)
    _write_split(features, "val", x[90:], y[90:], 5)
    metrics = knn_run(params)
    written = json.loads((Path(params.paths.metrics) / "knn.json").read_text())
    assert written == metrics
    assert set(written) == {f"top{t}_k{k}" for t in (1, 5) for k in (1, 5, 50)} | {"n_train", "n_val"}
    for k in (1, 5, 50):
        want = brute_force_knn(x[:90], y[:90], x[90:], y[90:], k, 0.07, 5)
        assert written[f"top1_k{k}"] == pytest.approx(want["top1"])
        assert written[f"top5_k{k}"] == pytest.approx(want["top5"])
    assert written["n_train"] == 90 and written["n_val"] == 30


def test_stage_names_files_on_mismatch(tmp_path):
    params = validate_params(tiny_params(tmp_path, knn={"baselines": False}))
    features = Path(params.paths.features)
    rng = np.random.default_rng(6)
    _write_split(features, "train", rng.normal(size=(20, 8)), rng.integers(0, 3, 20), 3)
    _write_split(features, "val", rng.normal(size=(10, 6)), rng.integers(0, 3, 10), 3)
    with pytest.raises(StageError, match=r"train/features.npy has D = 8.*val/features.npy has D = 6"):
        knn_run(params)
    _write_split(features, "val", rng.normal(size=(10, 8)), rng.integers(0, 3, 10), 3)
    np.save(features / "val" / "labels.npy", np.zeros(9, dtype=np.int64))
    with pytest.raises(FeaturesError, match=r"val/labels.npy: shape \(9,\) does not match 10 rows"):
        knn_run(params)
    assert not (Path(params.paths.metrics) / "knn.json").exists()
