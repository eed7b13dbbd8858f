"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official "python version" pickle batches.

CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` (our ``val``),
``batches.meta`` (``label_names``); each batch has ``data`` (N×3072 uint8) and ``labels``.
CIFAR-100: ``train``, ``test``, ``meta`` (``fine_label_names``); batches have ``data`` and
``fine_labels`` (the 100-class labels, as in the paper's transfer experiments).
The files may sit in ``root`` itself or in ``root/cifar-10-batches-py`` / ``root/cifar-100-python``
(the folders the archives unpack to). A row of ``data`` holds the R, G and B planes of a 32×32
image one after the other, each row-major.

The official files were pickled by Python 2; their keys read as bytes (``b"data"``) or str
depending on the unpickler's encoding, so both are accepted. Unpickling is restricted to the
numpy array constructors these files need, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from stages.cli import StageError
from stages.sources import Split

logger = logging.getLogger(__name__)

LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "val": ["test_batch"],
        "meta": "batches.meta",
        "names": "label_names",
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "val": ["test"],
        "meta": "meta",
        "names": "fine_label_names",
        "labels": "fine_labels",
    },
}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def load_batch(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file; keys (and byte-string values in lists) become str.

    Raises:
        StageError: naming the file when it is missing or not a CIFAR pickle.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StageError(f"{path}: cannot read CIFAR batch ({exc.strerror})") from None
    try:
        data = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # pickle raises many types on garbage input
        raise StageError(f"{path}: not a CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    return {
        _text(k): [_text(x) for x in v] if isinstance(v, list) else v for k, v in data.items()
    }


def _detect(root: Path) -> tuple[str, Path]:
    found = []
    for variant, layout in LAYOUTS.items():
        for folder in (root, root / layout["folder"]):
            if (folder / layout["meta"]).is_file() and (folder / layout["val"][0]).is_file():
                found.append((variant, folder))
                break
    if not found:
        raise StageError(
            f"{root}: no CIFAR files: expected batches.meta + data_batch_1..5 + test_batch (CIFAR-10) "
            "or meta + train + test (CIFAR-100), in root or in root/cifar-10-batches-py, root/cifar-100-python"
        )
    if len(found) > 1:
        raise StageError(
            f"{root}: holds both CIFAR-10 ({found[0][1]}) and CIFAR-100 ({found[1][1]}); "
            "point dataset.root at one of them"
        )
    return found[0]


class Cifar:
    """The CIFAR-10/100 source: 32×32 RGB images, loaded into memory.

    Args:
        root: the folder with the batches, or the folder above ``cifar-10-batches-py`` /
            ``cifar-100-python``.
    """

    name = "cifar"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.variant, self.folder = _detect(self.root)
        self.layout = LAYOUTS[self.variant]
        meta_path = self.folder / self.layout["meta"]
        meta = load_batch(meta_path)
        names = meta.get(self.layout["names"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StageError(f"{meta_path}: no {self.layout['names']!r} list of class names")
        self._classes = names
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        if split in self._data:
            return self._data[split]
        rows, labels = [], []
        for name in self.layout[split]:
            path = self.folder / name
            if not path.is_file():
                raise StageError(f"{path}: CIFAR batch missing")
            batch = load_batch(path)
            if "data" not in batch or self.layout["labels"] not in batch:
                raise StageError(
                    f"{path}: needs keys 'data' and {self.layout['labels']!r}, has {sorted(batch)}"
                )
            data = np.asarray(batch["data"])
            batch_labels = np.asarray(batch[self.layout["labels"]], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise StageError(f"{path}: data must be uint8 rows of 3072 values, got {data.dtype} {data.shape}")
            if len(batch_labels) != len(data):
                raise StageError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
            out_of_range = np.flatnonzero((batch_labels < 0) | (batch_labels >= len(self._classes)))
            if out_of_range.size:
                i = int(out_of_range[0])
                raise StageError(
                    f"{path}: label {batch_labels[i]} at row {i} is out of range ({len(self._classes)} classes)"
                )
            rows.append(data)
            labels.append(batch_labels)
        images = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        logger.info("%s: %d %s images from %s", self.variant, len(images), split, self.folder)
        self._data[split] = (images, np.concatenate(labels))
        return self._data[split]

    def describe(self) -> dict:
        return {"name": self.name, "root": str(self.root), "variant": self.variant}

    def classes(self) -> list[str]:
        return list(self._classes)

    def labels(self, split: Split) -> np.ndarray:
        return self._split(split)[1]

    def load(self, split: Split, index: int) -> np.ndarray:
        """The image as a uint8 array of shape (32, 32, 3)."""
        return self._split(split)[0][index]
