"""An ImageNet-style folder tree: ``root/{train,val}/<class>/<image>``.

Classes are the sub-folders of ``root/train``, sorted (as torchvision's ``ImageFolder``); hidden
folders (``.name``) are ignored. ``val`` may not hold a class that ``train`` lacks. Images are found
recursively under each class folder, sorted by path, by extension (case-insensitive):
jpg, jpeg, png, ppm, pgm, pbm, bmp, gif, tif, tiff, webp. Other files are ignored.

Every image is fully decoded once, so a corrupt file is found here rather than during training.
When the target format is jpg and the file is a JPEG, its bytes pass through unchanged (no second
generation loss); otherwise the decoded pixels are returned for re-encoding. An unreadable file
raises `BadImageError`; the shard stage counts, logs and skips it.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from stages.cli import StageError
from stages.sources import SPLITS, BadImageError, ImageLike, Split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder) / name)
    # Sort by the path relative to the class folder, so the order does not depend on the root.
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


class ImageFolder:
    """The ImageFolder source.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        image_format: the shards' image format; JPEG files pass through unchanged for ``"jpg"``.
    """

    name = "imagefolder"

    def __init__(self, root: str | Path, image_format: Literal["png", "jpg"] = "png") -> None:
        self.root = Path(root)
        self.image_format = image_format
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise StageError(f"{self.root / split}: missing; imagefolder expects root/{{train,val}}/<class>/<image>")
        self._classes = _class_dirs(self.root / "train")
        if not self._classes:
            raise StageError(f"{self.root / 'train'}: no class folders")
        self._files: dict[str, list[Path]] = {}
        self._labels: dict[str, np.ndarray] = {}

    def _scan(self, split: Split) -> None:
        split_dir = self.root / split
        index = {name: k for k, name in enumerate(self._classes)}
        files: list[Path] = []
        labels: list[int] = []
        for name in _class_dirs(split_dir):
            if name not in index:
                raise StageError(f"{split_dir / name}: class {name!r} is not a class of {self.root / 'train'}")
            found = _image_files(split_dir / name)
            if not found:
                logger.warning("%s: no image files", split_dir / name)
            files += found
            labels += [index[name]] * len(found)
        logger.info("imagefolder: %d %s images in %d classes", len(files), split, len(set(labels)))
        self._files[split] = files
        self._labels[split] = np.asarray(labels, dtype=np.int64)

    def describe(self) -> dict:
        return {"name": self.name, "root": str(self.root)}

    def classes(self) -> list[str]:
        return list(self._classes)

    def labels(self, split: Split) -> np.ndarray:
        if split not in self._labels:
            self._scan(split)
        return self._labels[split]

    def path(self, split: Split, index: int) -> Path:
        """The file of image `index` of `split`."""
        if split not in self._files:
            self._scan(split)
        return self._files[split][index]

    def load(self, split: Split, index: int) -> ImageLike:
        """JPEG bytes unchanged (target jpg, JPEG file) or the decoded PIL image.

        Raises:
            BadImageError: naming the file when it cannot be read or fully decoded.
        """
        path = self.path(split, index)
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a full decode: catches truncated and corrupt files
                if self.image_format == "jpg" and image.format == "JPEG":
                    return data
                return image.copy()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise BadImageError(str(path), f"{type(exc).__name__}: {exc}") from None
