"""The DAVIS colour palette and indexed (palette) PNG masks.

DAVIS annotations and results are 8-bit palette PNGs whose pixel values are object ids (0 the
background, 1..K the objects, 255 "void" in annotations) and whose palette is the PASCAL VOC
colour map: id i gets the colour whose bits interleave the bits of i (1 -> (128, 0, 0),
2 -> (0, 128, 0), 3 -> (128, 128, 0), ..., 255 -> (224, 224, 192)). The reference
implementation downloads this table (UVC's palette.txt) at run time; here it is computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stages.atomic import atomic_file

VOID_ID = 255


def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map.

    Args:
        n: number of ids (at most 256).

    Returns:
        (n, 3) uint8 array; row i is the RGB colour of object id i.
    """
    if not 1 <= n <= 256:
        raise ValueError(f"the palette has 1..256 entries, got {n}")
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def write_indexed_png(path: str | Path, mask: np.ndarray) -> None:
    """Write an object-id mask as an 8-bit palette PNG with the DAVIS palette (atomically).

    Args:
        path: the .png file to write.
        mask: (H, W) integer array of ids in 0..255.

    Raises:
        ValueError: the mask is not 2-D or holds ids outside 0..255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: an indexed PNG needs a 2-D mask, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: ids must be in 0..255, got {mask.min()}..{mask.max()}")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    with atomic_file(path, "wb") as handle:
        image.save(handle, format="PNG")


def read_indexed_png(path: str | Path) -> np.ndarray:
    """Read an object-id mask (palette "P" or grayscale "L" PNG) as its raw indices.

    Args:
        path: the PNG file.

    Returns:
        (H, W) uint8 array of ids (a palette image's indices, not its colours).

    Raises:
        ValueError: the file is not a single-channel 8-bit image (e.g. an RGB rendering of a mask,
            whose ids cannot be recovered).
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: a mask must be an 8-bit palette (P) or grayscale (L) PNG of object ids, "
                f"got mode {image.mode}"
            )
        return np.array(image, dtype=np.uint8)
