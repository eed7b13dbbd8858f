"""Few-shot (semi-supervised) evaluation on frozen features: logistic regression trained with 1% and
10% of the training labels (paper Table 12), stage `fewshot`.

The paper leaves the classifier's details out and the reference ships no script for it; this
stage documents its own choices:

- **Labelled subsets.** For a fraction f, each class c with n_c training samples contributes
  ``max(1, floor(f · n_c + 0.5))`` samples (stratified; at least one per class, so that a fraction
  giving less than one sample per class still sees every class). Within a class the samples are
  ordered by their key and permuted with a generator seeded by ``(seed, c)``; a fraction takes the
  first n_c of that permutation, so the subsets depend only on (keys, labels, seed, f), not on the
  features or their row order, and the smaller fraction's subset lies inside the larger one's. The
  chosen keys are written to ``paths.fewshot_subsets`` (JSON) beside the metrics.
- **Classifier.** scikit-learn's ``LogisticRegression`` (multinomial softmax, L-BFGS solver,
  ``max_iter`` iterations at most) with an L2 penalty of inverse strength ``C`` (sklearn's
  objective ``½‖W‖² + C Σ_i CE_i``), on L2-normalised features, with an intercept.
- **Metrics.** Top-1 and top-5 (the min(5, C) best classes, as `stages.knn`) in percent on the
  whole val split, per fraction: ``top1_<pct>pct``, ``top5_<pct>pct`` and ``n_labelled_<pct>pct``
  with ``<pct>`` the percentage (``1``, ``10``; a decimal point written ``p``: ``0p5``).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.params import Params

logger = logging.getLogger(__name__)


def fraction_tag(fraction: float) -> str:
    """The metrics-key form of a fraction: 0.01 -> "1", 0.1 -> "10", 0.005 -> "0p5"."""
    return f"{round(fraction * 100, 10):g}".replace(".", "p")


def per_class_count(n_class: int, fraction: float) -> int:
    """Labelled samples a class of `n_class` samples contributes: max(1, floor(f·n + 0.5)), at most
    n_class (0 for an empty class)."""
    if n_class <= 0:
        return 0
    return min(n_class, max(1, math.floor(fraction * n_class + 0.5)))


def fewshot_subsets(labels: Any, keys: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[float, np.ndarray]:
    """Stratified, seeded, nested labelled subsets (module docstring).

    Args:
        labels: (N,) integer class indices of the training samples.
        keys: N unique sample keys, in the same order.
        fractions: fractions of the labels in (0, 1].
        seed: the draw's seed.

    Returns:
        ``{fraction: sorted row indices (int64)}``.

    Raises:
        ValueError: lengths differ, keys repeat, or a fraction is outside (0, 1].
    """
    labels = np.asarray(labels)
    keys = [str(k) for k in keys]
    if labels.ndim != 1 or labels.shape[0] != len(keys):
        raise ValueError(f"{labels.shape} labels for {len(keys)} keys")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys repeat: the subsets are defined by keys")
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    key_array = np.asarray(keys, dtype=object)
    orders: dict[int, np.ndarray] = {}
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        rows = rows[np.argsort(key_array[rows], kind="stable")]  # by key: independent of row order
        orders[int(cls)] = rows[np.random.default_rng([seed, int(cls)]).permutation(rows.shape[0])]
    return {
        fraction: np.sort(np.concatenate([rows[: per_class_count(rows.shape[0], fraction)] for rows in orders.values()]))
        .astype(np.int64)
        for fraction in fractions
    }


def _l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def logistic_regression_accuracy(
    train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
    C: float = 1.0, max_iter: int = 1000, num_classes: int | None = None,
) -> dict[str, float]:
    """Fit the L2-regularised multinomial logistic regression on L2-normalised features and score it.

    Args:
        train_features: (N, D) labelled features.
        train_labels: (N,) class indices; at least two classes.
        test_features: (M, D) features to classify.
        test_labels: (M,) class indices.
        C: inverse L2 strength (sklearn's C).
        max_iter: L-BFGS iterations at most (not converging is logged as a warning).
        num_classes: C_total for top-5 (min(5, C_total) classes); default max label + 1.

    Returns:
        ``{"top1": %, "top5": %}``; a class never seen in training is never predicted.

    Raises:
        ValueError: fewer than two classes among the training labels.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_y, test_y = np.asarray(train_labels, dtype=np.int64), np.asarray(test_labels, dtype=np.int64)
    if np.unique(train_y).shape[0] < 2:
        raise ValueError("logistic regression needs labelled samples of at least two classes")
    classifier = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(_l2_normalise(train_features), train_y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("L-BFGS did not converge in %d iterations (raise fewshot.max_iter)", max_iter)
    scores = classifier.decision_function(_l2_normalise(test_features))  # (M, K) over classifier.classes_
    if scores.ndim == 1:  # two classes: sklearn returns the second class's margin only
        scores = np.stack([-scores, scores], axis=1)
    n_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    # Scores over every class; a class the classifier never saw ranks last (ties: lower index).
    full = np.full((scores.shape[0], n_classes), -np.inf)
    full[:, classifier.classes_] = scores
    ranking = np.argsort(-full, axis=1, kind="stable")[:, : min(5, n_classes)]  # (M, min(5, C))
    hits = ranking == test_y[:, None]
    n = max(test_y.shape[0], 1)
    top5 = hits.any(axis=1).sum()
    return {"top1": 100.0 * float(hits[:, 0].sum()) / n, "top5": 100.0 * float(top5) / n}


def run(params: Params) -> dict[str, float]:
    """Stage `fewshot`: subsets of the train features of ``paths.features``, one classifier per
    fraction, scored on the val features; writes ``paths.fewshot_subsets`` and
    ``<paths.metrics>/fewshot.json``.

    Returns:
        The flat metrics ``top1_<pct>pct``, ``top5_<pct>pct``, ``n_labelled_<pct>pct`` per fraction.
    """
    from stages.features import read_train_val

    cfg = params.fewshot
    root = Path(params.paths.features)
    data = read_train_val(root, params.paths.teacher_backbone)
    train_x, train_y, train_keys, val_x, val_y = data.train_x, data.train_y, data.train_keys, data.val_x, data.val_y
    num_classes = data.num_classes
    try:
        subsets = fewshot_subsets(train_y, train_keys, cfg.fractions, cfg.seed)
    except ValueError as exc:
        raise StageError(f"{root / 'train'}: {exc}") from None
    metrics: dict[str, float] = {}
    record: dict[str, Any] = {"seed": cfg.seed, "features": str(root / "train"), "subsets": {}}
    for fraction in sorted(set(cfg.fractions)):
        rows = subsets[fraction]
        tag = fraction_tag(fraction)
        try:
            result = logistic_regression_accuracy(train_x[rows], train_y[rows], val_x, val_y, cfg.C, cfg.max_iter,
                                                  num_classes)
        except ValueError as exc:
            raise StageError(f"{root / 'train'}: fraction {fraction}: {exc}") from None
        metrics[f"top1_{tag}pct"] = result["top1"]
        metrics[f"top5_{tag}pct"] = result["top5"]
        metrics[f"n_labelled_{tag}pct"] = float(rows.shape[0])
        record["subsets"][tag] = {
            "fraction": fraction,
            "n": int(rows.shape[0]),
            "per_class": {str(int(c)): int(n) for c, n in zip(*np.unique(train_y[rows], return_counts=True))},
            "keys": [train_keys[i] for i in rows],
        }
        logger.info("few-shot %s%% (%d labels): top-1 %.2f%%, top-5 %.2f%%", tag.replace("p", "."), rows.shape[0],
                    result["top1"], result["top5"])
    write_json(params.paths.fewshot_subsets, record)
    write_json(Path(params.paths.metrics) / "fewshot.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("fewshot", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
