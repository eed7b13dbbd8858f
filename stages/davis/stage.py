"""Stage `davis`: DAVIS-2017 semi-supervised video object segmentation with the frozen teacher
(paper Table 5), `python -m stages.davis [--params params.yaml]`.

Reads the DAVIS root `davis.root` (with `davis.root: null`, the stage writes the generated fixture,
`stages.fixtures.davis`, to `davis.fixture` and evaluates on it), propagates each val sequence's first annotation with the teacher
backbone's patch features (`stages.davis.propagate`), writes the predicted masks as palette PNGs
in the DAVIS results layout under `davis.results` (the whole folder atomically; the first frame's
result is its annotation with void set to background, as the reference copies it), scores them
(`stages.davis.evaluate`) and writes:

- `<paths.metrics>/davis.json`: J&F-Mean, J-/F- Mean, Recall, Decay (percent), n_sequences,
  n_objects;
- `<paths.plots>/davis_per_sequence.csv`: one row per object (name "<sequence>_<object>",
  sequence, object, the same seven statistics), as the toolkit's per-sequence results.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from stages.atomic import atomic_dir, write_json, write_text
from stages.cli import StageError, run_stage
from stages.davis.dataset import DavisLayoutError, load_sequence, num_objects, read_mask, read_sequence_names
from stages.davis.evaluate import SUMMARY_KEYS, ObjectScores, evaluate_objects, summarize
from stages.davis.palette import VOID_ID, write_indexed_png
from stages.davis.propagate import PropagationSettings, segment_sequence
from stages.device import resolve_device
from stages.params import Params

logger = logging.getLogger(__name__)

CSV_NAME = "davis_per_sequence.csv"


def davis_root(params: Params) -> Path:
    """`davis.root`, or (when null) the fixture, regenerated into `davis.fixture`.

    The fixture is a pure function of `stages.fixtures.davis` (deterministic bytes), so
    regenerating it on every run keeps it in step with that code.

    Raises:
        StageError: `davis.root` is set but is not a directory.
    """
    davis = params.davis
    if davis.root is not None:
        root = Path(davis.root)
        if not root.is_dir():
            raise StageError(f"{root}: davis.root is not a directory (expected JPEGImages/480p, "
                             "Annotations/480p and ImageSets/2017 inside)")
        return root
    from stages.fixtures.davis import make_fixture

    logger.info("davis.root is null: evaluating on the generated fixture in %s", davis.fixture)
    return make_fixture(davis.fixture)


def check_davis_params(params: Params) -> None:
    """Refuse, before any work, what the schema cannot see: a non-ViT model and frame sizes that
    are not whole numbers of patches.

    Raises:
        StageError: naming the keys.
    """
    model, davis = params.model, params.davis
    if model.arch == "resnet50":
        raise StageError("davis needs a ViT's patch features; model.arch = 'resnet50' has none")
    for key in ("short_side", "long_side_multiple"):
        value = getattr(davis, key)
        if value % model.patch_size:
            raise StageError(f"davis.{key} = {value} is not a multiple of model.patch_size = {model.patch_size}")


def _read_frame(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except OSError as exc:
        raise DavisLayoutError(f"{path}: cannot read frame ({exc})") from exc


def segment_davis_sequence(
    backbone: torch.nn.Module,
    root: Path,
    name: str,
    out_dir: Path,
    settings: PropagationSettings,
    device: torch.device,
) -> int:
    """Propagate one sequence and write `<out_dir>/<name>/<frame>.png` for every frame.

    Returns:
        The number of frames written.

    Raises:
        DavisLayoutError: unreadable frames, or frames whose size differs from the annotation.
    """
    seq = load_sequence(root, name)
    first = read_mask(seq.annotations[0])
    frames = (_read_frame(p) for p in seq.frames)
    write_indexed_png(out_dir / name / f"{seq.frame_ids[0]}.png", np.where(first == VOID_ID, 0, first))
    masks = segment_sequence(backbone, frames, first, settings, num_objects(first), device)
    written = 1
    try:
        for frame_id, mask in tqdm(zip(seq.frame_ids[1:], masks), total=len(seq.frames) - 1,
                                   desc=name, unit="frame", leave=False):
            write_indexed_png(out_dir / name / f"{frame_id}.png", mask)
            written += 1
    except ValueError as exc:
        raise DavisLayoutError(f"{seq.frames[0].parent}: {exc}") from exc
    return written


def per_object_csv(scores: list[ObjectScores]) -> str:
    """CSV text, one row per object: name ("<sequence>_<object>", as the toolkit's per-sequence
    results), sequence, object, then SUMMARY_KEYS (percent, 4 decimals)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "sequence", "object", *SUMMARY_KEYS])
    for s in scores:
        writer.writerow([f"{s.sequence}_{s.object_id}", s.sequence, s.object_id,
                         *(f"{s.statistics[k]:.4f}" for k in SUMMARY_KEYS)])
    return buffer.getvalue()


def run(params: Params) -> dict[str, float]:
    """Stage `davis`: segment every val sequence, write the results, score them.

    Returns:
        The metrics written to `<paths.metrics>/davis.json`.
    """
    from stages.dino.checkpoint import load_teacher, teacher_path

    check_davis_params(params)
    teacher_path(params)  # before the fixture is written
    root = davis_root(params)
    names = read_sequence_names(root, "val")
    device = resolve_device(params.davis.device, "davis.device")
    backbone = load_teacher(params).to(device)
    settings = PropagationSettings.from_params(params.davis)
    logger.info("davis: %d sequences of %s, %s, device %s", len(names), root, settings, device)
    results = Path(params.davis.results)
    frames = 0
    with atomic_dir(results) as tmp:
        for name in tqdm(names, desc="davis", unit="seq"):
            frames += segment_davis_sequence(backbone, root, name, tmp, settings, device)
    logger.info("davis: %d frames written to %s", frames, results)
    scores = evaluate_objects(root, results, names, params.davis.exclude_void)
    metrics = summarize(scores)
    for s in scores:
        logger.info("%s object %d: J&F %.1f (J %.1f, F %.1f)", s.sequence, s.object_id,
                    s.statistics["J&F-Mean"], s.statistics["J-Mean"], s.statistics["F-Mean"])
    write_json(Path(params.paths.metrics) / "davis.json", metrics)
    write_text(Path(params.paths.plots) / CSV_NAME, per_object_csv(scores))
    logger.info("davis: J&F-Mean %.2f, J-Mean %.2f, F-Mean %.2f", metrics["J&F-Mean"], metrics["J-Mean"],
                metrics["F-Mean"])
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("davis", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
