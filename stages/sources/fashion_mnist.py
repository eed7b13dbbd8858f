"""Fashion-MNIST (Xiao et al. 2017) from its four IDX files: 60k train, 10k test (our ``val``).

The files are those of the official release (and of Debian's ``dataset-fashion-mnist``, installed
in /usr/share/datasets/fashion-mnist): ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; the uncompressed files (same names
without ``.gz``) are accepted too. The IDX format is parsed here: a big-endian header of two zero
bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one uint32 per dimension,
then the data in C order.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from stages.cli import StageError
from stages.sources import Split

logger = logging.getLogger(__name__)

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise StageError(f"{root / (stem + '.gz')}: Fashion-MNIST file not found (nor {stem} uncompressed)")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or not).

    Args:
        path: the file.
        ndim: the expected number of dimensions (3 for images, 1 for labels).

    Returns:
        uint8 array with the file's dimensions, e.g. (N, 28, 28) or (N,).

    Raises:
        StageError: naming the file for a bad magic number, wrong dimensions or a short file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise StageError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4:
        raise StageError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    expected = (IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise StageError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise StageError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise StageError(f"{path}: IDX dimensions {dims} need {size} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class FashionMNIST:
    """The Fashion-MNIST source: 28×28 grayscale images, 10 classes, loaded into memory.

    Args:
        root: the folder holding the four IDX files.
    """

    name = "fashion-mnist"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._data:
            images_path = _find(self.root, FILES[split][0])
            labels_path = _find(self.root, FILES[split][1])
            images = read_idx(images_path, 3)
            labels = read_idx(labels_path, 1).astype(np.int64)
            if len(images) != len(labels):
                raise StageError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
            if len(labels) and labels.max() >= len(CLASSES):
                bad = int(np.flatnonzero(labels >= len(CLASSES))[0])
                raise StageError(f"{labels_path}: label {labels[bad]} at index {bad} is not one of the 10 classes")
            logger.info("%s: %d %s images of %s", self.name, len(images), split, images.shape[1:])
            self._data[split] = (images, labels)
        return self._data[split]

    def describe(self) -> dict:
        return {"name": self.name, "root": str(self.root)}

    def classes(self) -> list[str]:
        return list(CLASSES)

    def labels(self, split: Split) -> np.ndarray:
        return self._split(split)[1]

    def load(self, split: Split, index: int) -> np.ndarray:
        """The image as a uint8 array of shape (28, 28)."""
        return self._split(split)[0][index]
