"""The frozen-features artifact: one folder per split, written whole and atomically.

Layout of ``features/<dataset>/<split>/`` (DESIGN.md, "Artifact formats"):

- ``features.npy``: float32, shape (N, D), the pooled features as the backbone gave them (only the
  ``multiscale`` pooling is L2-normalised; evaluations normalise themselves where the paper does).
- ``labels.npy``: int64, shape (N,), class indices (the manifest's class order).
- ``keys.txt``: N lines, the shard sample keys, in the same order.
- ``meta.json``: how the features were made: model arch/patch size, checkpoint sha256, pooling,
  image size, n_last_blocks, ...; plus ``n`` and ``dim`` so a reader can check the arrays.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.atomic import atomic_dir, atomic_file
from stages.cli import StageError
from stages.file_digest import file_sha256

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
KEYS_FILE = "keys.txt"
META_FILE = "meta.json"


class FeaturesError(StageError):
    """A features folder is missing, malformed or inconsistent; the message names the file."""


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def write_features(
    directory: str | Path,
    features: Any,
    labels: Any,
    keys: Sequence[str],
    meta: dict[str, Any],
) -> Path:
    """Write one split's features folder atomically (the whole folder replaces `directory`).

    Args:
        directory: the split folder, e.g. ``features/fmnist/train``.
        features: float array or tensor, shape (N, D); stored as float32.
        labels: integer array or tensor, shape (N,); stored as int64.
        keys: N sample keys (no newlines).
        meta: JSON-serialisable description (model, checkpoint sha256, pooling, image size, ...);
            ``n`` and ``dim`` are added.

    Returns:
        The folder written.

    Raises:
        ValueError: shapes disagree, features are not finite, a key is empty or holds a newline.
    """
    directory = Path(directory)
    feats = _as_numpy(features)
    labs = _as_numpy(labels)
    keys = [str(k) for k in keys]
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {feats.shape} for {directory}")
    n, dim = feats.shape
    if labs.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like features, got {labs.shape} for {directory}")
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} feature rows in {directory}")
    if not np.issubdtype(labs.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labs.dtype} for {directory}")
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise ValueError(f"non-finite feature in row {bad} (key {keys[bad]!r}) for {directory}")
    for key in keys:
        if not key or "\n" in key or "\r" in key:
            raise ValueError(f"invalid sample key {key!r} for {directory}")
    meta = {**meta, "n": int(n), "dim": int(dim)}
    with atomic_dir(directory) as tmp:
        with atomic_file(tmp / FEATURES_FILE) as handle:
            np.save(handle, feats)
        with atomic_file(tmp / LABELS_FILE) as handle:
            np.save(handle, labs.astype(np.int64))
        with atomic_file(tmp / KEYS_FILE, "w") as handle:
            handle.write("".join(f"{k}\n" for k in keys))
        with atomic_file(tmp / META_FILE, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.write("\n")
    logger.info("wrote %d features of dim %d to %s", n, dim, directory)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and return ``meta.json`` of a features folder (a mapping)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FeaturesError(f"{path}: missing (is {directory} a features folder? run the extract stage)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise FeaturesError(f"{path}: unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise FeaturesError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    return meta


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FeaturesError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise FeaturesError(f"{path}: not a readable .npy array: {exc}") from None


def read_features(directory: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Read and validate one split's features folder.

    Args:
        directory: the split folder written by `write_features`.

    Returns:
        ``(features, labels, keys, meta)``: float32 (N, D), int64 (N,), N keys, the meta mapping.

    Raises:
        FeaturesError: a file is missing or unreadable, or N/D disagree between the files (the
            message names the file).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    feats_path, labels_path, keys_path = (directory / f for f in (FEATURES_FILE, LABELS_FILE, KEYS_FILE))
    feats = _load_npy(feats_path)
    labels = _load_npy(labels_path)
    if feats.ndim != 2:
        raise FeaturesError(f"{feats_path}: must be 2-D (N, D), has shape {feats.shape}")
    if feats.dtype != np.float32:
        raise FeaturesError(f"{feats_path}: must be float32, is {feats.dtype}")
    n, dim = feats.shape
    if labels.dtype != np.int64:
        raise FeaturesError(f"{labels_path}: must be int64, is {labels.dtype}")
    if labels.shape != (n,):
        raise FeaturesError(
            f"{labels_path}: shape {labels.shape} does not match {n} rows of {feats_path}"
        )
    try:
        keys = keys_path.read_text().splitlines()
    except FileNotFoundError:
        raise FeaturesError(f"{keys_path}: missing") from None
    if len(keys) != n:
        raise FeaturesError(f"{keys_path}: {len(keys)} keys for {n} rows of {feats_path}")
    for name, expected in (("n", n), ("dim", dim)):
        if name in meta and meta[name] != expected:
            raise FeaturesError(
                f"{directory / META_FILE}: {name} = {meta[name]!r} but {feats_path} has {expected}"
            )
    return feats, labels, keys, meta


def check_features_checkpoint(
    meta: dict[str, Any], checkpoint_path: str | Path, directory: str | Path | None = None
) -> None:
    """Refuse features extracted from another checkpoint than the one the evaluation is told to use.

    Compares ``meta["checkpoint_sha256"]`` (written by the extract stage) with the sha256 of the
    file at `checkpoint_path` (``paths.teacher_backbone``). Nothing is checked, with a log line,
    when the meta names no hash (features made elsewhere) or the checkpoint file is absent.

    Args:
        meta: a features folder's ``meta.json`` mapping.
        checkpoint_path: the checkpoint the features should come from.
        directory: the features folder, for the message.

    Raises:
        FeaturesError: the hashes differ; the message names both files and both hashes.
    """
    where = Path(directory) / META_FILE if directory is not None else Path(META_FILE)
    expected = meta.get("checkpoint_sha256")
    checkpoint_path = Path(checkpoint_path)
    if not isinstance(expected, str):
        logger.info("%s names no checkpoint_sha256: not checked against %s", where, checkpoint_path)
        return
    if not checkpoint_path.is_file():
        logger.warning("%s: cannot check the features' checkpoint, %s does not exist", where, checkpoint_path)
        return
    actual = file_sha256(checkpoint_path)
    if actual != expected:
        raise FeaturesError(
            f"{where}: the features were extracted from checkpoint sha256 {expected} "
            f"({meta.get('checkpoint', 'path not recorded')}), but {checkpoint_path} has sha256 {actual}: "
            "stale features; rerun the extract stage"
        )


@dataclass(frozen=True)
class TrainVal:
    """A features folder's train/ and val/ splits, checked against each other."""

    train_x: np.ndarray
    train_y: np.ndarray
    train_keys: list[str]
    train_meta: dict[str, Any]
    val_x: np.ndarray
    val_y: np.ndarray
    val_meta: dict[str, Any]
    num_classes: int | None  # from meta.json; None when neither split names it


def read_train_val(root: str | Path, checkpoint_path: str | Path) -> TrainVal:
    """``<root>/train`` and ``<root>/val`` as the evaluations read them: both extracted from
    `checkpoint_path` (`check_features_checkpoint`), of one dimension, labels in [0,
    ``num_classes``) of meta.json.

    Raises:
        FeaturesError: a split is unreadable, from another checkpoint, of another dimension, or
            holds negative labels or labels >= num_classes; the message names the file.
    """
    train_dir, val_dir = Path(root) / "train", Path(root) / "val"
    train_x, train_y, train_keys, train_meta = read_features(train_dir)
    val_x, val_y, _, val_meta = read_features(val_dir)
    for directory, meta in ((train_dir, train_meta), (val_dir, val_meta)):
        check_features_checkpoint(meta, checkpoint_path, directory)
    if train_x.shape[1] != val_x.shape[1]:
        raise FeaturesError(
            f"feature dimensions differ: {train_dir / FEATURES_FILE} has D = {train_x.shape[1]}, "
            f"{val_dir / FEATURES_FILE} has D = {val_x.shape[1]} (extracted with different models "
            f"or poolings? train: {train_meta.get('pooling')}, val: {val_meta.get('pooling')})"
        )
    counts = {m["num_classes"] for m in (train_meta, val_meta) if isinstance(m.get("num_classes"), int)}
    num_classes = max(counts) if counts else None
    for directory, labels in ((train_dir, train_y), (val_dir, val_y)):
        if labels.size and labels.min() < 0:
            raise FeaturesError(f"{directory / LABELS_FILE}: negative labels")
        if num_classes is not None and labels.size and labels.max() >= num_classes:
            raise FeaturesError(f"{directory / LABELS_FILE}: labels outside [0, {num_classes}) of {META_FILE}")
    return TrainVal(train_x, train_y, train_keys, train_meta, val_x, val_y, val_meta, num_classes)
