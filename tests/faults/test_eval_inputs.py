"""Fault 7: evaluation inputs that do not fit, through the `knn`, `linear` and `fewshot` stages'
command lines: train/val features of different dimensions, labels that do not match the features, and
features whose meta.json names another checkpoint than paths.teacher_backbone. A linear
checkpoint made on features of another dimension is not loaded into the new classifier."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import fewshot, knn, linear
from stages.features import FEATURES_FILE, LABELS_FILE, META_FILE, write_features
from tiny_config import tiny_params, write_params

pytestmark = pytest.mark.faults

N_TRAIN, N_VAL, CLASSES = 40, 20, 4


def make_workspace(root: Path, val_dim: int = 8, train_dim: int = 8) -> tuple[Path, dict]:
    """A teacher file and train/val features whose meta names it; returns (params file, params)."""
    params = tiny_params(root, knn={"k": [5], "baselines": False},
                         linear={"mode": "features", "epochs": 2, "batch_size": 16, "device": "cpu", "num_workers": 0})
    params["paths"]["linear"] = str(root / "models/linear")  # not in the tiny config's paths
    teacher = Path(params["paths"]["teacher_backbone"])
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"teacher weights v1")
    meta = {"checkpoint": str(teacher), "checkpoint_sha256": hashlib.sha256(teacher.read_bytes()).hexdigest(),
            "pooling": "cls", "num_classes": CLASSES}
    rng = np.random.default_rng(0)
    features = Path(params["paths"]["features"])
    for split, n, dim in (("train", N_TRAIN, train_dim), ("val", N_VAL, val_dim)):
        labels = np.arange(n) % CLASSES
        feats = rng.normal(size=(n, dim)) + 3 * np.eye(CLASSES, dim)[labels]
        write_features(features / split, feats, labels, [f"{split}_{i}" for i in range(n)], {**meta, "split": split})
    return write_params(root / "params.yaml", params), params


def failure(main, params_file: Path, caplog) -> str:
    """Run a stage's main; it must exit 1; return its logged failure message."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(["--params", str(params_file)])
    messages = [r.getMessage() for r in caplog.records if r.name == "stages.cli"]
    assert code == 1, caplog.text
    assert len(messages) == 1, caplog.text
    return messages[0]


# every stage that reads train/ and val/ features (`stages.features.read_train_val`)
READERS, READER_IDS = [knn.main, linear.main, fewshot.main], ["knn", "linear", "fewshot"]


def test_matching_inputs_evaluate(tmp_path: Path, caplog) -> None:
    """The control: the workspace as made evaluates (so the failures below are the faults')."""
    params_file, params = make_workspace(tmp_path)
    assert knn.main(["--params", str(params_file)]) == 0
    assert linear.main(["--params", str(params_file)]) == 0
    assert (Path(params["paths"]["metrics"]) / "knn.json").is_file()


@pytest.mark.parametrize("main", READERS, ids=READER_IDS)
def test_features_of_another_dimension(tmp_path: Path, main, caplog) -> None:
    params_file, params = make_workspace(tmp_path, val_dim=6)
    message = failure(main, params_file, caplog)
    features = Path(params["paths"]["features"])
    assert "feature dimensions differ" in message and "D = 8" in message and "D = 6" in message
    assert str(features / "train") in message and str(features / "val") in message


@pytest.mark.parametrize("main", READERS, ids=READER_IDS)
def test_label_count_mismatch(tmp_path: Path, main, caplog) -> None:
    params_file, params = make_workspace(tmp_path)
    labels = Path(params["paths"]["features"]) / "val" / LABELS_FILE
    np.save(labels, np.arange(N_VAL - 1, dtype=np.int64) % CLASSES)
    message = failure(main, params_file, caplog)
    assert str(labels) in message and f"({N_VAL - 1},)" in message and f"{N_VAL} rows" in message


@pytest.mark.parametrize("main", READERS, ids=READER_IDS)
def test_labels_outside_the_classes(tmp_path: Path, main, caplog) -> None:
    params_file, params = make_workspace(tmp_path)
    labels = Path(params["paths"]["features"]) / "train" / LABELS_FILE
    np.save(labels, np.full(N_TRAIN, CLASSES, dtype=np.int64))
    message = failure(main, params_file, caplog)
    assert str(labels) in message and f"[0, {CLASSES})" in message


@pytest.mark.parametrize("main", READERS, ids=READER_IDS)
def test_features_from_another_checkpoint(tmp_path: Path, main, caplog) -> None:
    params_file, params = make_workspace(tmp_path)
    teacher = Path(params["paths"]["teacher_backbone"])
    old = hashlib.sha256(teacher.read_bytes()).hexdigest()
    teacher.write_bytes(b"teacher weights v2")  # pretrain ran again; extract did not
    message = failure(main, params_file, caplog)
    meta = Path(params["paths"]["features"]) / "train" / META_FILE
    assert str(meta) in message and str(teacher) in message
    assert old in message and hashlib.sha256(b"teacher weights v2").hexdigest() in message
    assert not list(Path(params["paths"]["metrics"]).glob("*.json"))


def test_linear_checkpoint_of_another_dimension_is_not_loaded(tmp_path: Path, caplog) -> None:
    params_file, params = make_workspace(tmp_path)
    assert linear.main(["--params", str(params_file)]) == 0
    checkpoint = Path(params["paths"]["linear"]) / linear.CHECKPOINT_NAME
    assert torch.load(checkpoint, weights_only=True)["classifier"]["linear.weight"].shape == (CLASSES, 8)
    features = Path(params["paths"]["features"])
    rng = np.random.default_rng(1)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):  # re-extracted with another pooling: D = 6
        labels = np.arange(n) % CLASSES
        write_features(features / split, rng.normal(size=(n, 6)), labels, [f"{split}_{i}" for i in range(n)],
                       {"checkpoint_sha256": hashlib.sha256(b"teacher weights v1").hexdigest(),
                        "num_classes": CLASSES, "pooling": "gem"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert linear.main(["--params", str(params_file)]) == 0
    assert "made with other params (source_sha256): starting from scratch" in caplog.text
    assert torch.load(checkpoint, weights_only=True)["classifier"]["linear.weight"].shape == (CLASSES, 6)
