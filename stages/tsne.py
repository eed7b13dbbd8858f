"""t-SNE of the class-mean features (paper Appendix H, Fig. 11), stage `tsne`.

Each training feature of ``paths.features/train`` is L2-normalised (``tsne.normalize``, as the
k-NN evaluation treats DINO features), the features of each class are averaged, the class means are
reduced by PCA to ``min(tsne.pca_dim, n_classes, D)`` dimensions (paper: 30) and embedded in 2-D by
scikit-learn's t-SNE with exact gradients (``method="exact"``: there is one point per class, at
most a few thousand, so the O(n²) method is affordable and avoids the Barnes-Hut approximation;
``init="pca"``, ``learning_rate="auto"``, seeded). The perplexity is ``tsne.perplexity`` (paper: 20) capped at ``(n - 1) / 3`` for n classes,
the bound of van der Maaten's reference implementation (bhtsne refuses ``n - 1 < 3·perplexity``),
so that datasets with few classes (10 for the demo: perplexity 3) still work; with fewer than 2
classes there is nothing to embed (error).

Outputs: ``<paths.plots>/tsne.png`` (each class a point labelled with its name, the class names of
the shard manifest as the extract stage copied them into the features' meta.json),
``<paths.plots>/tsne.csv`` (columns class, name, x, y; a DVC plot) and ``<paths.metrics>/tsne.json``
(number of points, effective perplexity, PCA dimension, final KL divergence).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.atomic import atomic_file, write_json, write_text
from stages.cli import StageError, run_stage
from stages.params import Params

logger = logging.getLogger(__name__)

PNG_NAME = "tsne.png"
CSV_NAME = "tsne.csv"


def class_means(features: Any, labels: Any, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature of every class present.

    Args:
        features: (N, D) features.
        labels: (N,) integer class indices.
        normalize: L2-normalise each row before averaging.

    Returns:
        ``(classes, means)``: the sorted class indices present (K,) and their means (K, D) float64.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {x.shape} and {y.shape}")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes]) if classes.size else np.zeros((0, x.shape[1]))
    return classes, means


def effective_perplexity(perplexity: float, n_points: int) -> float:
    """``min(perplexity, (n_points - 1) / 3)``: bhtsne's bound for n points (module docstring)."""
    return float(min(perplexity, (n_points - 1) / 3.0))


def embed(means: np.ndarray, pca_dim: int = 30, perplexity: float = 20.0, max_iter: int = 1000,
          seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """PCA then t-SNE of K points.

    Args:
        means: (K, D) points, K >= 2.
        pca_dim: PCA dimension before t-SNE, capped at min(K, D).
        perplexity: t-SNE perplexity before the (K - 1) / 3 cap.
        max_iter: t-SNE iterations.
        seed: random_state of PCA and t-SNE.

    Returns:
        ``(coords (K, 2), info)`` with info ``perplexity``, ``pca_dim``, ``kl_divergence``.

    Raises:
        ValueError: fewer than 2 points.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    k = means.shape[0]
    if k < 2:
        raise ValueError(f"t-SNE needs at least 2 classes, got {k}")
    dim = min(pca_dim, k, means.shape[1])
    reduced = PCA(n_components=dim, random_state=seed).fit_transform(means)
    perp = effective_perplexity(perplexity, k)
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", max_iter=max_iter,
                method="exact", random_state=seed)
    coords = tsne.fit_transform(reduced)
    return coords, {"perplexity": perp, "pca_dim": float(dim), "kl_divergence": float(tsne.kl_divergence_)}


def plot_png(coords: np.ndarray, names: Sequence[str], title: str = "") -> bytes:
    """A labelled scatter plot of the points as PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    try:
        colours = plt.get_cmap("tab20")(np.arange(len(names)) % 20)
        ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=40)
        for (x, y), name in zip(coords, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _class_names(meta: dict[str, Any], classes: np.ndarray) -> list[str]:
    """Names from the features' meta.json (the shard manifest's classes, copied by extract); a class
    without one is called "class <index>"."""
    names = meta.get("classes")
    names = names if isinstance(names, list) else []
    return [str(names[c]) if c < len(names) else f"class {c}" for c in classes.tolist()]


def run(params: Params) -> dict[str, float]:
    """Stage `tsne` (module docstring): writes the PNG, the CSV and ``<paths.metrics>/tsne.json``.

    Returns:
        ``{"n_points", "perplexity", "pca_dim", "kl_divergence"}``.
    """
    from stages.features import read_features

    cfg = params.tsne
    train_dir = Path(params.paths.features) / "train"
    features, labels, _, meta = read_features(train_dir)
    classes, means = class_means(features, labels, cfg.normalize)
    try:
        coords, info = embed(means, cfg.pca_dim, cfg.perplexity, cfg.max_iter, cfg.seed)
    except ValueError as exc:
        raise StageError(f"{train_dir}: {exc}") from None
    names = _class_names(meta, classes)
    metrics = {"n_points": float(classes.shape[0]), **info}
    logger.info("t-SNE of %d class means (PCA %d, perplexity %.3g): KL %.4f", classes.shape[0], info["pca_dim"],
                info["perplexity"], info["kl_divergence"])
    plots = Path(params.paths.plots)
    title = f"class means of {train_dir} (t-SNE, perplexity {info['perplexity']:.3g})"
    with atomic_file(plots / PNG_NAME, "wb") as handle:
        handle.write(plot_png(coords, names, title))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "name", "x", "y"])
    for cls, name, (x, y) in zip(classes.tolist(), names, coords.tolist()):
        writer.writerow([cls, name, f"{x:.6g}", f"{y:.6g}"])
    write_text(plots / CSV_NAME, table.getvalue())
    write_json(Path(params.paths.metrics) / "tsne.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("tsne", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
