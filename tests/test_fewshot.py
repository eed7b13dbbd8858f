"""Few-shot logistic regression: stratified, seeded, nested subsets stable under reruns and row
order; accuracy on separable features; the stage's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages.cli import StageError
from stages.features import write_features
from stages.fewshot import fewshot_subsets, fraction_tag, logistic_regression_accuracy, per_class_count
from stages.fewshot import run as fewshot_run
from stages.params import validate_params
from test_linear import eval_config, separable_features


def _labels_and_keys(counts: dict[int, int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    labels = labels[order]
    keys = [f"train_{i:05d}" for i in order]  # keys unrelated to the row order
    return labels, keys


def test_per_class_count_rounds_and_keeps_one() -> None:
    assert [per_class_count(n, 0.01) for n in (0, 1, 49, 50, 149, 150, 1300)] == [0, 1, 1, 1, 1, 2, 13]
    assert per_class_count(30, 0.1) == 3 and per_class_count(35, 0.1) == 4 and per_class_count(34, 0.1) == 3
    assert per_class_count(5, 1.0) == 5


def test_fraction_tag() -> None:
    assert [fraction_tag(f) for f in (0.01, 0.1, 0.005, 1.0)] == ["1", "10", "0p5", "100"]


def test_subsets_are_stratified_nested_and_stable() -> None:
    counts = {0: 120, 1: 30, 2: 7, 3: 251}
    labels, keys = _labels_and_keys(counts)
    subsets = fewshot_subsets(labels, keys, (0.01, 0.1), seed=0)
    for fraction, rows in subsets.items():
        assert np.all(np.diff(rows) > 0)  # sorted, no repeats
        got = {int(c): int(n) for c, n in zip(*np.unique(labels[rows], return_counts=True))}
        assert got == {c: max(1, math.floor(fraction * n + 0.5)) for c, n in counts.items()}
    small = {keys[i] for i in subsets[0.01]}
    large = {keys[i] for i in subsets[0.1]}
    assert small < large  # the 1% labels are among the 10% ones
    # Stable: a rerun, and the same samples in another row order, pick the same keys.
    again = fewshot_subsets(labels, keys, (0.01, 0.1), seed=0)
    assert all(np.array_equal(again[f], subsets[f]) for f in subsets)
    perm = np.random.default_rng(5).permutation(labels.shape[0])
    shuffled = fewshot_subsets(labels[perm], [keys[i] for i in perm], (0.1,), seed=0)[0.1]
    assert {keys[perm[i]] for i in shuffled} == large
    other_seed = {keys[i] for i in fewshot_subsets(labels, keys, (0.1,), seed=1)[0.1]}
    assert other_seed != large and len(other_seed) == len(large)


def test_subsets_refuse_repeated_keys() -> None:
    with pytest.raises(ValueError, match="repeat"):
        fewshot_subsets(np.array([0, 1]), ["a", "a"], (0.5,))


def test_logistic_regression_on_separable_features() -> None:
    rng = np.random.default_rng(0)
    centres = 5.0 * np.eye(8)[:4]
    train_y = np.repeat(np.arange(4), 3)
    test_y = rng.integers(0, 4, 200)
    train_x = centres[train_y] + 0.2 * rng.standard_normal((12, 8))
    test_x = centres[test_y] + 0.2 * rng.standard_normal((200, 8))
    result = logistic_regression_accuracy(train_x, train_y, test_x, test_y, C=10.0)
    assert result == {"top1": 100.0, "top5": 100.0}
    # Labels swapped for classes 0 and 1 in the test set: exactly their share is wrong.
    swapped = np.where(test_y == 0, 1, np.where(test_y == 1, 0, test_y))
    wrong = 100.0 * np.isin(test_y, (0, 1)).mean()
    result = logistic_regression_accuracy(train_x, train_y, test_x, swapped, C=10.0)
    assert result["top1"] == pytest.approx(100.0 - wrong)
    assert result["top5"] == 100.0  # 4 classes: top-5 is top-4
    with pytest.raises(ValueError, match="two classes"):
        logistic_regression_accuracy(train_x[:3], train_y[:3], test_x, test_y)


def test_stage_writes_metrics_and_stable_subsets(tmp_path: Path) -> None:
    params = validate_params(eval_config(tmp_path, fewshot={"fractions": [0.01, 0.1], "C": 10.0}))
    separable_features(Path(params.paths.features), n_classes=5, n_train=400, n_val=100)
    metrics = fewshot_run(params)
    assert set(metrics) == {"top1_1pct", "top5_1pct", "n_labelled_1pct", "top1_10pct", "top5_10pct",
                            "n_labelled_10pct"}
    assert metrics["top1_10pct"] >= 95.0 and metrics["top1_1pct"] >= 90.0
    assert json.loads((Path(params.paths.metrics) / "fewshot.json").read_text()) == metrics
    subsets_file = Path(params.paths.fewshot_subsets)
    record = json.loads(subsets_file.read_text())
    labels = np.load(Path(params.paths.features) / "train/labels.npy")
    keys = (Path(params.paths.features) / "train/keys.txt").read_text().splitlines()
    expected = fewshot_subsets(labels, keys, (0.01, 0.1), seed=0)
    for tag, fraction in (("1", 0.01), ("10", 0.1)):
        assert record["subsets"][tag]["keys"] == [keys[i] for i in expected[fraction]]
        assert metrics[f"n_labelled_{tag}pct"] == len(expected[fraction])
    assert record["subsets"]["1"]["n"] == 5  # < 1 per class at 1% of ~80: one each
    first = subsets_file.read_bytes()
    assert fewshot_run(params) == metrics
    assert subsets_file.read_bytes() == first


def test_stage_refuses_a_single_class(tmp_path: Path) -> None:
    params = validate_params(eval_config(tmp_path))
    for split in ("train", "val"):
        write_features(Path(params.paths.features) / split, np.ones((4, 3), np.float32), np.zeros(4, np.int64),
                       [f"{split}{i}" for i in range(4)], {"num_classes": 1})
    with pytest.raises(StageError, match="two classes"):
        fewshot_run(params)
