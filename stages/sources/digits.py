"""scikit-learn's bundled digits (UCI optical digits test set): 1,797 8×8 grayscale images.

Pixel values 0..16 are scaled to 0..255 (round(v·255/16)). There is no official split: ``val`` is
a stratified ``ceil(N·val_fraction)`` of the images (the rounding of sklearn's
``train_test_split``), chosen with the seed; ``train`` is the rest; both keep the bundled order.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from stages.sources import Split, stratified_subset

logger = logging.getLogger(__name__)


def digits_uint8(values: np.ndarray) -> np.ndarray:
    """Scale digits pixels from 0..16 to uint8 0..255; any shape."""
    return np.rint(np.asarray(values, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)


class Digits:
    """The digits source, split into train/val deterministically.

    Args:
        val_fraction: the share of images in ``val`` (0 < f <= 1).
        seed: the seed of the stratified split.
    """

    name = "digits"

    def __init__(self, val_fraction: float, seed: int) -> None:
        from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

        bunch = load_digits()
        self.val_fraction = val_fraction
        self.seed = seed
        self._images = digits_uint8(bunch.images)  # (1797, 8, 8)
        self._labels = np.asarray(bunch.target, dtype=np.int64)
        self._classes = [str(name) for name in bunch.target_names]
        n_val = math.ceil(len(self._labels) * val_fraction)
        val = stratified_subset(self._labels, n_val, seed)
        mask = np.zeros(len(self._labels), dtype=bool)
        mask[val] = True
        self._index = {"train": np.flatnonzero(~mask), "val": np.flatnonzero(mask)}
        logger.info("digits: %d train, %d val images", mask.size - mask.sum(), mask.sum())

    def describe(self) -> dict:
        return {"name": self.name, "root": None, "val_fraction": self.val_fraction, "split_seed": self.seed}

    def classes(self) -> list[str]:
        return list(self._classes)

    def labels(self, split: Split) -> np.ndarray:
        return self._labels[self._index[split]]

    def load(self, split: Split, index: int) -> np.ndarray:
        """The image as a uint8 array of shape (8, 8)."""
        return self._images[self._index[split][index]]
