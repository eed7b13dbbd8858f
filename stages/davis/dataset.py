"""The DAVIS-2017 on-disk layout (semi-supervised task, 480p), read strictly.

    <root>/ImageSets/2017/val.txt           one sequence name per line
    <root>/JPEGImages/480p/<seq>/00000.jpg  the frames, in file-name order
    <root>/Annotations/480p/<seq>/00000.png palette PNGs: 0 background, 1..K objects, 255 void

A results folder has the same layout as the annotations: `<results>/<seq>/<frame>.png`, one
palette PNG per frame, named like the frame. Every problem raises `DavisLayoutError` naming the
file or folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.cli import StageError
from stages.davis.palette import VOID_ID, read_indexed_png

RESOLUTION = "480p"
YEAR = "2017"


class DavisLayoutError(StageError):
    """A DAVIS root or results folder does not have the expected layout or content."""


@dataclass(frozen=True)
class Sequence:
    """One video of a DAVIS root.

    Attributes:
        name: sequence name (folder name).
        frames: the frame JPEGs, sorted by name.
        annotations: the annotation PNGs, sorted by name (at least the first frame's).
    """

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path, ...]

    @property
    def frame_ids(self) -> tuple[str, ...]:
        """Frame names without extension ("00000", ...): the names of the result PNGs."""
        return tuple(p.stem for p in self.frames)


def read_sequence_names(root: str | Path, subset: str = "val") -> list[str]:
    """The sequence names of `<root>/ImageSets/2017/<subset>.txt` (blank lines skipped)."""
    path = Path(root) / "ImageSets" / YEAR / f"{subset}.txt"
    if not path.is_file():
        raise DavisLayoutError(f"{path}: no such file (expected the DAVIS-2017 layout under {root})")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DavisLayoutError(f"{path}: lists no sequence")
    return names


def load_sequence(root: str | Path, name: str) -> Sequence:
    """Find a sequence's frames and annotations.

    Raises:
        DavisLayoutError: no frames, no first-frame annotation, or an annotation without a frame.
    """
    root = Path(root)
    frame_dir = root / "JPEGImages" / RESOLUTION / name
    annot_dir = root / "Annotations" / RESOLUTION / name
    frames = tuple(sorted(frame_dir.glob("*.jpg")))
    if not frames:
        raise DavisLayoutError(f"{frame_dir}: no *.jpg frames for sequence {name!r}")
    annotations = tuple(sorted(annot_dir.glob("*.png")))
    first = annot_dir / f"{frames[0].stem}.png"
    if first not in annotations:
        raise DavisLayoutError(f"{first}: missing first-frame annotation of sequence {name!r}")
    stems = {p.stem for p in frames}
    orphans = [p.name for p in annotations if p.stem not in stems]
    if orphans:
        raise DavisLayoutError(f"{annot_dir}: annotations without a frame: {', '.join(orphans[:5])}")
    return Sequence(name=name, frames=frames, annotations=annotations)


def read_mask(path: str | Path) -> np.ndarray:
    """An annotation or result PNG as its (H, W) uint8 object ids.

    Raises:
        DavisLayoutError: missing or not an indexed/grayscale PNG.
    """
    path = Path(path)
    if not path.is_file():
        raise DavisLayoutError(f"{path}: no such mask file")
    try:
        return read_indexed_png(path)
    except (ValueError, OSError) as exc:
        raise DavisLayoutError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc


def num_objects(first_mask: np.ndarray) -> int:
    """Objects of a sequence: the largest id of its first annotation, void (255) excluded."""
    ids = first_mask[first_mask != VOID_ID]
    return int(ids.max()) if ids.size else 0
