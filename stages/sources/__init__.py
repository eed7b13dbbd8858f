"""Source datasets the shard stage reads: one module per format, one protocol for all.

A source knows, for each split (``"train"``, ``"val"``), its labels in a stable source order and
how to load the image at an index; the shard stage picks the (optionally stratified) subset from
the labels alone, then loads only those images. Keys are ``<split>_<index>`` with the index in the
source order, zero-padded to at least six digits (``"train_000123"``): stable, unique, dot-free.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Protocol, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from stages.params import Dataset

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")

#: What `Source.load` returns: already-encoded bytes in the target format (passed through
#: unchanged), a PIL image, or a uint8 array of shape (H, W) or (H, W, 3).
ImageLike = Union[bytes, Image.Image, np.ndarray]


class BadImageError(Exception):
    """One source image cannot be read or decoded; the shard stage counts and skips it."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


class Source(Protocol):
    """A dataset on disk (or bundled), read in a fixed order."""

    name: str

    def describe(self) -> dict:
        """What the manifest records as the source (name, root, ...; JSON-serialisable)."""
        ...

    def classes(self) -> list[str]:
        """Class names in index order."""
        ...

    def labels(self, split: Split) -> np.ndarray:
        """The class index of every image of `split` in source order; int64, shape (N,)."""
        ...

    def load(self, split: Split, index: int) -> ImageLike:
        """The image at `index` of `split`; raises BadImageError if unreadable."""
        ...


def open_source(dataset: "Dataset") -> Source:
    """Build the source named by ``dataset.source`` from the validated params section.

    Raises:
        stages.cli.StageError: the source's files are missing or malformed (naming the file).
    """
    if dataset.source == "fashion-mnist":
        from stages.sources.fashion_mnist import FashionMNIST

        return FashionMNIST(dataset.root)
    if dataset.source == "digits":
        from stages.sources.digits import Digits

        return Digits(val_fraction=dataset.val_fraction, seed=dataset.seed)
    if dataset.source == "imagefolder":
        from stages.sources.imagefolder import ImageFolder

        return ImageFolder(dataset.root, image_format=dataset.image_format)
    if dataset.source == "cifar":
        from stages.sources.cifar import Cifar

        return Cifar(dataset.root)
    raise ValueError(f"unknown dataset.source {dataset.source!r}")


def class_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split `n` over classes in proportion to `counts` (largest-remainder method).

    Each class gets floor(n·c_k/N); the remaining slots go to the largest fractional parts (ties:
    lower class index first). The result never exceeds a class's count.

    Args:
        counts: int array (K,), images per class.
        n: how many to pick in total, 0 <= n <= counts.sum().

    Returns:
        int64 array (K,) summing to n.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= n <= total:
        raise ValueError(f"cannot pick {n} of {total}")
    exact = counts * n  # quota_k = exact_k / total, kept in integers to avoid rounding drift
    quotas = exact // total if total else np.zeros_like(counts)
    remainders = exact - quotas * total
    left = n - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -remainders))  # largest remainder, then index
    quotas[order[:left]] += 1
    return quotas


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Pick `n` indices with each class represented in proportion, deterministically.

    Args:
        labels: int array (N,) of class indices in source order.
        n: subset size; None or n >= N keeps every index.
        seed: the random seed; the same (labels, n, seed) always gives the same subset.

    Returns:
        Sorted int64 array of the chosen indices (so the source order is kept).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n is None or n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, inverse = np.unique(labels, return_inverse=True)
    quotas = class_quotas(np.bincount(inverse, minlength=len(classes)), n)
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        chosen.append(rng.choice(members, size=int(quotas[k]), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_key(split: str, index: int, total: int) -> str:
    """The stable key of image `index` of a split of `total` images: ``"train_000123"``."""
    width = max(6, len(str(max(total - 1, 0))))
    return f"{split}_{index:0{width}d}"
