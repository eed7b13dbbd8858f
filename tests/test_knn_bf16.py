"""The bf16-certified exact k-NN search (stages/knn_bf16.py, stages/_knn_select.c) against an
exact float64 search: same neighbours in the same order, ties to the lower index, the crowded-row
fallback, and the stage's k-NN through both searches. bf16 products run on any CPU (slowly without
AMX), so these run everywhere."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import stages.knn_bf16 as knn_bf16
from stages._knn_select import candidates, rerank
from stages.knn import knn_classify_multi, knn_predict
from stages.knn_bf16 import ERROR_BOUND, Bf16CertifiedIndex


def _unit(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def _clusters(n: int, q: int, d: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d))
    train_y, test_y = rng.integers(0, 10, n), rng.integers(0, 10, q)
    train = _unit(centres[train_y] + noise * rng.normal(size=(n, d)))
    test = _unit(centres[test_y] + noise * rng.normal(size=(q, d)))
    return train, train_y, test, test_y


def _exact(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, best first, ties to the lower index."""
    scores = queries.astype(np.float64) @ train.astype(np.float64).T
    order = np.stack([np.lexsort((np.arange(len(train)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize(("n", "d", "noise", "k"), [(5000, 64, 3.0, 20), (3000, 37, 0.3, 10), (700, 16, 1.0, 20),
                                                    (90, 8, 1.0, 90)])
def test_same_neighbours_as_an_exact_search(n: int, d: int, noise: float, k: int) -> None:
    """Large and small sets (fewer blocks than k: every item a candidate), D not a multiple of 16, k = N."""
    train, _, test, _ = _clusters(n, 300, d, noise)
    scores, neighbours = Bf16CertifiedIndex(train).search(test, k)
    exact_scores, exact_neighbours = _exact(train, test, k)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    # Neighbour sets equal except where float32 cannot order two scores (gap below its rounding).
    gaps = np.abs(exact_scores[:, -1:] - (test.astype(np.float64) @ train.astype(np.float64).T))
    ambiguous = (np.sort(gaps, axis=1)[:, 1] < 1e-6)
    same = (np.sort(neighbours, 1) == np.sort(exact_neighbours, 1)).all(1)
    assert same[~ambiguous].all() and same.mean() > 0.99


def test_exact_ties_go_to_the_lower_index() -> None:
    base = _unit(np.random.default_rng(1).normal(size=(200, 24)))
    train = np.ascontiguousarray(np.concatenate([base, base, base]))  # every score three times
    _, neighbours = Bf16CertifiedIndex(train).search(base[:50], 6)
    for row, query in zip(neighbours, range(50)):
        assert list(row[:3]) == [query, query + 200, query + 400]


def test_crowded_rows_fall_back_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    train, _, test, _ = _clusters(4000, 100, 32, 5.0)
    monkeypatch.setattr(knn_bf16, "CAPACITY", 25)  # most rows have more candidates than 25
    scores, neighbours = Bf16CertifiedIndex(train).search(test, 20)
    exact_scores, exact_neighbours = _exact(train, test, 20)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    assert (np.sort(neighbours, 1) == np.sort(exact_neighbours, 1)).all(1).mean() > 0.99


def test_candidates_keep_every_item_within_the_margin() -> None:
    """By hand: one row of 128 scores (2 blocks), k = 1: the threshold is the top block maximum
    minus the margin, and exactly the items at or above it are kept, in index order."""
    row = torch.full((1, 128), -0.5, dtype=torch.bfloat16)
    row[0, [3, 70, 100]] = torch.tensor([0.5, 0.49, 0.3], dtype=torch.bfloat16)
    found, counts = np.empty((1, 8), np.int32), np.empty(1, np.int32)
    candidates(row.view(torch.int16).numpy(), 1, 128, 1, 0.02, found, counts)
    assert counts[0] == 2 and list(found[0, :2]) == [3, 70]
    candidates(row.view(torch.int16).numpy(), 1, 128, 2, 0.25, found, counts)  # 2nd block max 0.49
    assert counts[0] == 3 and list(found[0, :3]) == [3, 70, 100]
    scores, indices = np.empty((1, 2), np.float32), np.empty((1, 2), np.int64)
    queries, train = np.ones((1, 1), np.float32), np.linspace(-1, 1, 128, dtype=np.float32)[:, None].copy()
    rerank(queries, train, found, counts, 1, 128, 1, 2, scores, indices)
    assert list(indices[0]) == [100, 70] and scores[0, 0] == train[100, 0]


def test_error_bound_holds_on_adversarial_vectors() -> None:
    """bf16 scores of unit vectors stay within ERROR_BOUND of float64's, for vectors whose
    components all round badly (just above a bf16 half-way point) and for random ones."""
    rng = np.random.default_rng(0)
    worst = np.full((4, 1024), 1 + 2.0 ** -9 + 2.0 ** -20) * rng.choice([-1, 1], size=(4, 1024))
    rows = _unit(np.concatenate([worst, rng.normal(size=(60, 1024)), np.abs(rng.normal(size=(60, 1024)))]))
    approx = (torch.from_numpy(rows).bfloat16() @ torch.from_numpy(rows).bfloat16().t()).float().numpy()
    assert np.abs(approx - rows.astype(np.float64) @ rows.astype(np.float64).T).max() <= ERROR_BOUND


@pytest.mark.parametrize("search", ["faiss", "bf16"])
def test_stage_knn_is_the_same_through_either_search(search: str) -> None:
    train, train_y, test, test_y = _clusters(3000, 400, 48, 2.0, seed=3)
    results = knn_classify_multi(train, train_y, test, test_y, (1, 20), 0.07, chunk_size=128, search=search)
    other = knn_classify_multi(train, train_y, test, test_y, (1, 20), 0.07, search="faiss")
    assert results == other
    assert (knn_predict(train, train_y, test, 20, search=search) == knn_predict(train, train_y, test, 20, search="faiss")).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="search must be"):
        knn_predict(np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3)), 2, search="gpu")
    with pytest.raises(ValueError, match="C-contiguous"):
        Bf16CertifiedIndex(np.ones((4, 3)))
    with pytest.raises(ValueError, match="training rows must be L2-normalised"):
        Bf16CertifiedIndex(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="k = 5 outside 1..4"):
        Bf16CertifiedIndex(np.eye(4, 3, dtype=np.float32)).search(np.eye(1, 3, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="candidates: expected"):
        candidates(np.zeros(10, np.int16), 1, 20, 1, 0.0, np.empty((1, 4), np.int32), np.empty(1, np.int32))


def test_without_the_extension_auto_searches_with_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source tree where stages._knn_select was never compiled still runs the k-NN (faiss)."""
    import faiss

    from stages.knn import _exact_index

    monkeypatch.setitem(sys.modules, "stages.knn_bf16", None)  # its import now raises ImportError
    train = _unit(np.random.default_rng(0).normal(size=(50, 256)))
    assert isinstance(_exact_index(train, "auto"), faiss.IndexFlatIP)
    with pytest.raises(ImportError):
        _exact_index(train, "bf16")


@pytest.mark.parametrize("native_bf16, dim, expected", [
    (True, 256, "bf16"), (True, 64, "faiss"), (False, 256, "faiss"),
])
def test_auto_takes_the_bf16_pass_only_where_it_pays(monkeypatch: pytest.MonkeyPatch, native_bf16: bool,
                                                     dim: int, expected: str) -> None:
    """"auto": the bf16 pass on CPUs that multiply bf16 natively (AMX or AVX512-BF16) and for
    MIN_DIM <= D; faiss' float32 search elsewhere."""
    import faiss

    import stages.knn_bf16
    from stages.knn import _exact_index

    monkeypatch.setattr(stages.knn_bf16, "has_native_bf16", lambda: native_bf16)
    index = _exact_index(_unit(np.random.default_rng(0).normal(size=(50, dim))), "auto")
    assert isinstance(index, Bf16CertifiedIndex if expected == "bf16" else faiss.IndexFlatIP)
