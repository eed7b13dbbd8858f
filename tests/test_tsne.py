"""t-SNE of class means: the means against a loop, the perplexity cap, the stage's PNG/CSV/metrics
on features extracted from the tiny digits shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stages.cli import StageError
from stages.features import write_features
from stages.params import validate_params
from stages.tsne import class_means, effective_perplexity, embed
from stages.tsne import run as tsne_run
from test_linear import eval_config, tiny_pipeline


def test_class_means_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4))
    y = rng.choice([0, 2, 5], size=30)
    classes, means = class_means(x, y, normalize=True)
    assert classes.tolist() == [0, 2, 5]
    for c, mean in zip(classes, means):
        rows = [x[i] / np.sqrt(sum(v * v for v in x[i])) for i in range(30) if y[i] == c]
        np.testing.assert_allclose(mean, sum(rows) / len(rows), rtol=1e-12)
    _, raw = class_means(x, y, normalize=False)
    np.testing.assert_allclose(raw[1], x[y == 2].mean(axis=0))


def test_perplexity_is_capped_for_few_points() -> None:
    assert effective_perplexity(20.0, 1000) == 20.0
    assert effective_perplexity(20.0, 10) == 3.0
    assert effective_perplexity(20.0, 61) == 20.0 and effective_perplexity(20.0, 60) == pytest.approx(59 / 3)


def test_embed_separates_far_groups() -> None:
    rng = np.random.default_rng(1)
    points = np.concatenate([rng.normal(0, 0.1, (6, 40)), rng.normal(10, 0.1, (6, 40))])
    coords, info = embed(points, pca_dim=30, perplexity=20.0, max_iter=500, seed=0)
    assert coords.shape == (12, 2) and info["pca_dim"] == 12 and info["perplexity"] == pytest.approx(11 / 3)
    within = np.linalg.norm(coords[:6, None] - coords[None, :6], axis=-1).max()
    between = np.linalg.norm(coords[:6, None] - coords[None, 6:], axis=-1).min()
    assert between > within
    with pytest.raises(ValueError, match="at least 2"):
        embed(points[:1])


def test_stage_on_tiny_extracted_features(tmp_path: Path) -> None:
    params = tiny_pipeline(tmp_path, subset={"train": 100, "val": 20}, tsne={"max_iter": 300})
    metrics = tsne_run(params)
    assert metrics["n_points"] == 10 and metrics["perplexity"] == 3.0 and metrics["pca_dim"] == 10
    assert json.loads((Path(params.paths.metrics) / "tsne.json").read_text()) == pytest.approx(metrics)
    png = (Path(params.paths.plots) / "tsne.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with open(Path(params.paths.plots) / "tsne.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    manifest = json.loads((Path(params.paths.shards) / "manifest.json").read_text())
    assert len(rows) == 10
    assert [r["name"] for r in rows] == manifest["classes"] and [int(r["class"]) for r in rows] == list(range(10))
    assert all(np.isfinite(float(r["x"])) and np.isfinite(float(r["y"])) for r in rows)
    first = (Path(params.paths.plots) / "tsne.csv").read_bytes()
    tsne_run(params)
    assert (Path(params.paths.plots) / "tsne.csv").read_bytes() == first  # seeded: same coordinates


def test_stage_refuses_one_class(tmp_path: Path) -> None:
    params = validate_params(eval_config(tmp_path))
    write_features(Path(params.paths.features) / "train", np.ones((3, 2), np.float32), np.zeros(3, np.int64),
                   ["a", "b", "c"], {})
    with pytest.raises(StageError, match="at least 2 classes"):
        tsne_run(params)
