"""Weighted k-NN classification on frozen features (paper Sec. 4.1 and Appendix F.1; the
reference's eval_knn.py), and the stage `knn` with its raw-pixel and random-init baselines.

The classifier (Wu et al. 2018, as used by DINO): features are L2-normalised, the k training
samples with the highest cosine similarity s_i to a query vote for their class with weight
exp(s_i / T), and the class with the largest summed weight is the prediction. Paper defaults:
k = 20, T = 0.07; the paper reports k in {10, 20, 100, 200}.

Search is exact and runs over query chunks, so memory is bounded by the training features plus a
chunk of (chunk, k) neighbours and (chunk, C) class scores, never the (N_test, N_train) similarity
matrix. `search`: "faiss" (``IndexFlatIP`` on the normalised features, float32), "bf16"
(`stages.knn_bf16`: candidates from a bf16 product with a proven error bound, re-ranked in float32:
the same neighbours, 1.1-1.8x faster than faiss where the CPU multiplies bf16 natively), or "auto"
(bf16 on CPUs with AMX or AVX512-BF16 for 128 <= D <= 8192, else faiss).

Conventions (where the reference is silent or differs):

- k larger than the number of training samples is clamped to it (a warning is logged): every
  training sample then votes.
- Top-5 is "the true class is among the min(5, C) highest scores", C = number of classes; with
  fewer than 5 classes it is the top-C accuracy, i.e. 100%. (The reference uses min(5, k), which
  for k < 5 ignores classes beyond the k-th; with 1000 classes and k >= 5 both agree.)
- Ties between class scores go to the lower class index (stable sort); classes without a vote
  score 0 and rank after every voted class. Ties between neighbours of exactly equal similarity at
  the k-th position go to the lower training index (faiss in practice; the bf16 search by
  construction). Scores that differ only in float32's last bits may rank in either order,
  depending on the summation order, as between any two BLAS libraries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.features import read_train_val
from stages.params import Params

logger = logging.getLogger(__name__)

QUERY_CHUNK = 4096
RANDOM_INIT_SEED = 0


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().float().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def _l2_normalise(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation; float32, C-contiguous (faiss' layout). (N, D) -> (N, D)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return np.ascontiguousarray(features / np.maximum(norms, eps), dtype=np.float32)


def _check_inputs(
    train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    train_x, train_y = _as_numpy(train_features), _as_numpy(train_labels)
    test_x, test_y = _as_numpy(test_features), _as_numpy(test_labels)
    for name, x in (("train_features", train_x), ("test_features", test_x)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite values")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train_features has D = {train_x.shape[1]}, "
            f"test_features has D = {test_x.shape[1]}"
        )
    for name, y, x in (("train", train_y, train_x), ("test", test_y, test_x)):
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}_labels has shape {y.shape}, expected ({x.shape[0]},) like {name}_features")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}_labels must be integers, got dtype {y.dtype}")
    if train_x.shape[0] == 0:
        raise ValueError("train_features is empty: k-NN needs at least one training sample")
    if test_x.shape[0] == 0:
        raise ValueError("test_features is empty: nothing to classify")
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    observed = int(max(train_y.max(), test_y.max())) + 1
    if min(train_y.min(), test_y.min()) < 0:
        raise ValueError("labels must be >= 0")
    if num_classes is None:
        num_classes = observed
    elif observed > num_classes:
        raise ValueError(f"label {observed - 1} out of range for num_classes = {num_classes}")
    return train_x, train_y, test_x, test_y, int(num_classes)


def _exact_index(train: np.ndarray, search: str) -> Any:
    """An exact inner-product index over normalised (N, D) float32 rows with faiss' `search(x, k)`."""
    import faiss

    if search not in ("auto", "faiss", "bf16"):
        raise ValueError(f"search must be 'auto', 'faiss' or 'bf16', got {search!r}")
    try:
        from stages.knn_bf16 import MAX_DIM, MIN_DIM, Bf16CertifiedIndex, has_native_bf16
    except ImportError:  # the C extension stages._knn_select is not built (a bare source tree)
        if search == "bf16":
            raise
        logger.warning("stages._knn_select is not built (`pip install -e .` compiles it); searching with faiss")
    else:
        if search == "bf16" or (search == "auto" and has_native_bf16() and MIN_DIM <= train.shape[1] <= MAX_DIM):
            return Bf16CertifiedIndex(train)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return index


def _rankings(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, ks: list[int],
    temperature: float, chunk_size: int, search: str = "auto",
) -> Iterator[tuple[slice, dict[int, np.ndarray]]]:
    """Checked inputs → per query chunk: (its rows, {k: (rows, min(5, C)) classes, best first})."""
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be a non-empty list of positive integers, got {ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_train = train_x.shape[0]
    for k in ks:
        if k > n_train:
            logger.warning("k = %d exceeds the %d training samples; using k = %d", k, n_train, n_train)
    k_max = min(max(ks), n_train)
    top_m = min(5, n_classes)
    index = _exact_index(_l2_normalise(train_x), search)
    starts = range(0, test_x.shape[0], chunk_size)
    for start in tqdm(starts, desc=f"k-NN search (k <= {k_max})", unit="chunk", disable=len(starts) < 2):
        rows = slice(start, start + chunk_size)
        sims, neighbours = index.search(_l2_normalise(test_x[rows]), k_max)  # (B, k_max), sorted by similarity
        if (neighbours < 0).any():
            raise RuntimeError("the search returned fewer neighbours than requested")
        neighbour_labels = train_y[neighbours]  # (B, k_max)
        weights = np.exp(sims.astype(np.float64) / temperature)  # (B, k_max)
        offsets = np.arange(len(sims))[:, None] * n_classes
        rankings = {}
        for k in ks:
            kk = min(k, n_train)
            flat = (offsets + neighbour_labels[:, :kk]).ravel()
            scores = np.bincount(flat, weights[:, :kk].ravel(), minlength=len(sims) * n_classes)
            scores = scores.reshape(len(sims), n_classes)  # (B, C)
            rankings[k] = np.argsort(-scores, axis=1, kind="stable")[:, :top_m]  # (B, min(5, C))
        yield rows, rankings


def knn_classify_multi(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    ks: Iterable[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = QUERY_CHUNK,
    search: str = "auto",
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy for several k from one search with max(k) neighbours.

    Args:
        train_features: (N_train, D) float array or tensor (the database).
        train_labels: (N_train,) integer class indices.
        test_features: (N_test, D) float array or tensor (the queries).
        test_labels: (N_test,) integer class indices.
        ks: neighbour counts; each is clamped to N_train (with a warning).
        temperature: T in the vote weight exp(cos / T).
        num_classes: C; default max label + 1 over train and test.
        chunk_size: queries searched and scored at once (bounds memory).
        search: "auto", "faiss" or "bf16" (module docstring).

    Returns:
        ``{k: {"top1": %, "top5": %}}`` for every requested k (keys as given, before clamping).

    Raises:
        ValueError: shapes, dimensions or labels are inconsistent, or k/temperature invalid.
    """
    ks = [int(k) for k in ks]
    train_x, train_y, test_x, test_y, n_classes = _check_inputs(
        train_features, train_labels, test_features, test_labels, num_classes
    )
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for rows, rankings in _rankings(train_x, train_y, test_x, n_classes, ks, temperature, chunk_size, search):
        targets = test_y[rows][:, None]
        for k, ranking in rankings.items():
            hits = ranking == targets
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(axis=1).sum())
    total = test_x.shape[0]
    return {k: {"top1": 100.0 * correct1[k] / total, "top5": 100.0 * correct5[k] / total} for k in ks}


def knn_predict(
    train_features: Any, train_labels: Any, test_features: Any, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, search: str = "auto",
) -> np.ndarray:
    """The weighted k-NN prediction (class index) of every test sample, (N_test,) int64."""
    unlabelled = np.zeros(len(test_features), dtype=np.int64)
    train_x, train_y, test_x, _, n_classes = _check_inputs(
        train_features, train_labels, test_features, unlabelled, num_classes
    )
    return np.concatenate([rankings[int(k)][:, 0] for _, rankings in
                           _rankings(train_x, train_y, test_x, n_classes, [int(k)], temperature, QUERY_CHUNK,
                                     search)])


def knn_classify(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 accuracy in percent (paper defaults k = 20, T = 0.07).

    Args:
        train_features: (N_train, D) float array or tensor; L2-normalised here.
        train_labels: (N_train,) integer class indices.
        test_features: (N_test, D) float array or tensor; L2-normalised here.
        test_labels: (N_test,) integer class indices.
        k: neighbours (clamped to N_train with a warning).
        temperature: T in the vote weight exp(cos / T).
        num_classes: C; default max label + 1.

    Returns:
        ``{"top1": %, "top5": %}``; top-5 counts the min(5, C) best classes (module docstring).
    """
    return knn_classify_multi(
        train_features, train_labels, test_features, test_labels, (k,), temperature, num_classes
    )[int(k)]


def _flat_metrics(results: dict[int, dict[str, float]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{name}_k{k}": float(res[name]) for k, res in results.items() for name in ("top1", "top5")}


def _evaluate(params: Params, train: tuple, val: tuple, num_classes: int | None, what: str) -> dict:
    results = knn_classify_multi(
        train[0], train[1], val[0], val[1], params.knn.k, params.knn.temperature, num_classes
    )
    for k, res in results.items():
        logger.info("%s k-NN k=%d T=%g: top-1 %.2f%%, top-5 %.2f%%", what, k, params.knn.temperature, res["top1"], res["top5"])
    return results


def pixel_features(params: Params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw-pixel baseline features of one split: the shard images resized (shorter side to
    extract.resize, bicubic) and center-cropped to extract.crop_size as for extraction, in [0, 1]
    without normalisation, flattened to (N, 3·crop_size²) float32. Memory: N·3·crop_size²·4 bytes.
    """
    from torch import nn

    from stages.extract import extract_split, pixel_transform

    transform = pixel_transform(params.extract.resize, params.extract.crop_size)
    logger.info("raw-pixel baseline (%s): %d values per image, float32", split, 3 * params.extract.crop_size**2)
    feats, labels, _ = extract_split(params, split, nn.Identity(), transform=transform, pooling="cls")
    return feats.numpy(), labels.numpy()


def random_backbone_features(params: Params, split: str, seed: int = RANDOM_INIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Random-init baseline features of one split: a backbone of params.model's architecture
    initialised with torch seed `seed` (no training), pooled as extract.pooling. (N, D) float32."""
    import torch

    from stages.dino.backbones import build_backbone_from_params
    from stages.extract import extract_split

    with torch.random.fork_rng(devices=[]):  # built on the CPU; the caller's RNG is left alone
        torch.manual_seed(seed)
        backbone = build_backbone_from_params(params.model, drop_path_rate=0.0)
    feats, labels, _ = extract_split(params, split, backbone)
    return feats.numpy(), labels.numpy()


def run(params: Params) -> dict[str, float]:
    """Stage `knn`: weighted k-NN of features/<dataset>/val against .../train, every k in
    params.knn.k; with params.knn.baselines also on raw pixels and on a randomly initialised
    backbone of the same architecture. Writes ``<paths.metrics>/knn.json`` (rank 0).

    Returns:
        The flat metrics: ``top1_k{k}``, ``top5_k{k}``, and with baselines ``pixels_top1_k{k}``,
        ``pixels_top5_k{k}``, ``random_top1_k{k}``, ``random_top5_k{k}``; plus ``n_train``,
        ``n_val``.
    """
    from stages.distributed import is_main_process

    features_dir = Path(params.paths.features)
    data = read_train_val(features_dir, params.paths.teacher_backbone)
    num_classes = data.num_classes
    if data.train_meta.get("pooling", "cls") != "cls":
        logger.warning("k-NN on %s features of %s (extract.pooling); the paper's k-NN reads the CLS token",
                       data.train_meta["pooling"], features_dir)
    try:
        metrics = _flat_metrics(_evaluate(params, (data.train_x, data.train_y), (data.val_x, data.val_y),
                                          num_classes, "features"))
    except ValueError as exc:
        raise StageError(f"k-NN on {features_dir}/train and val: {exc}") from None
    metrics["n_train"], metrics["n_val"] = float(data.train_x.shape[0]), float(data.val_x.shape[0])
    del data

    if params.knn.baselines:
        from stages.extract import check_extract_params

        check_extract_params(params)  # the random-init baseline extracts like the extract stage
        pixels = {split: pixel_features(params, split) for split in ("train", "val")}
        metrics.update(_flat_metrics(_evaluate(params, pixels["train"], pixels["val"], num_classes, "pixels"), "pixels_"))
        del pixels
        rand = {split: random_backbone_features(params, split) for split in ("train", "val")}
        metrics.update(_flat_metrics(_evaluate(params, rand["train"], rand["val"], num_classes, "random-init"), "random_"))

    if is_main_process():
        write_json(Path(params.paths.metrics) / "knn.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("knn", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
