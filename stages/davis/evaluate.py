"""DAVIS-2017 semi-supervised evaluation of a results folder: J and F per object and frame, their
statistics per object, and the benchmark's summary numbers.

Protocol as the DAVIS-2017 toolkit (davis2017-evaluation, `DAVISEvaluation` with task
"semi-supervised"): the objects of a sequence are the ids 1..K of its first annotation; every
annotated frame except the first (given) and the last is evaluated; each object gets J and F per
frame (`stages.davis.metrics`), then Mean / Recall / Decay over its frames; the summary averages
every object of every sequence alike, and J&F-Mean = (J-Mean + F-Mean) / 2.

Numbers are percentages (as the paper's Table 5 and our other metrics), not the toolkit's
fractions. Void pixels (255 in the annotation) count as background by default, as in the
toolkit's published numbers (its loader sets 255 to 0 before its metric functions see a void
mask); `exclude_void=True` leaves them out of J and clears them from both masks before F, as those
metric functions intend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from stages.davis.dataset import DavisLayoutError, load_sequence, num_objects, read_mask
from stages.davis.metrics import BOUNDARY_THRESHOLD, boundary_f_measure, db_statistics, region_similarity
from stages.davis.palette import VOID_ID

logger = logging.getLogger(__name__)

STATISTICS = ("Mean", "Recall", "Decay")
SUMMARY_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


@dataclass
class ObjectScores:
    """J and F of one object over the evaluated frames of its sequence.

    Attributes:
        sequence: sequence name.
        object_id: object id (1..K).
        frames: the evaluated frame names.
        j: (T,) J per frame, fractions.
        f: (T,) F per frame, fractions.
    """

    sequence: str
    object_id: int
    frames: tuple[str, ...]
    j: np.ndarray
    f: np.ndarray
    statistics: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        stats: dict[str, float] = {}
        for name, values in (("J", self.j), ("F", self.f)):
            for stat, value in zip(STATISTICS, db_statistics(values)):
                stats[f"{name}-{stat}"] = 100.0 * value
        stats["J&F-Mean"] = (stats["J-Mean"] + stats["F-Mean"]) / 2
        self.statistics = stats


def score_sequence(
    davis_root: str | Path,
    results_dir: str | Path,
    sequence: str,
    exclude_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> list[ObjectScores]:
    """J and F of every object of one sequence.

    Args:
        davis_root: the DAVIS root (Annotations/480p/<sequence>/*.png).
        results_dir: folder holding <sequence>/<frame>.png predicted masks.
        sequence: sequence name.
        exclude_void: leave void (255) pixels out (see the module docstring).
        bound_th: F's matching tolerance (fraction of the diagonal, or pixels when >= 1).

    Returns:
        One ObjectScores per object id 1..K (K from the first annotation); empty when K = 0.

    Raises:
        DavisLayoutError: fewer than 3 annotated frames, a missing result PNG, a result whose size
            differs from its annotation, or a result id above K.
    """
    seq = load_sequence(davis_root, sequence)
    annotations = seq.annotations
    if len(annotations) < 3:
        raise DavisLayoutError(
            f"{annotations[0].parent}: {len(annotations)} annotated frames; the semi-supervised "
            "protocol evaluates all but the first and the last, so at least 3 are needed"
        )
    n_obj = num_objects(read_mask(annotations[0]))
    if n_obj == 0:
        logger.warning("%s: the first annotation has no object; sequence skipped", annotations[0])
        return []
    evaluated = annotations[1:-1]
    j = np.zeros((n_obj, len(evaluated)))
    f = np.zeros((n_obj, len(evaluated)))
    for t, annotation in enumerate(evaluated):
        gt = read_mask(annotation)
        result_path = Path(results_dir) / sequence / annotation.name
        if not result_path.is_file():
            raise DavisLayoutError(f"{result_path}: missing result for frame {annotation.stem} of {sequence!r}")
        pred = read_mask(result_path)
        if pred.shape != gt.shape:
            raise DavisLayoutError(
                f"{result_path}: size {pred.shape[1]}x{pred.shape[0]} differs from its annotation's "
                f"{gt.shape[1]}x{gt.shape[0]}"
            )
        if pred.max() > n_obj:
            raise DavisLayoutError(
                f"{result_path}: object id {int(pred.max())} but {sequence!r} has {n_obj} objects"
            )
        void = (gt == VOID_ID) if exclude_void else None
        for k in range(1, n_obj + 1):
            j[k - 1, t] = region_similarity(gt == k, pred == k, void)
            f[k - 1, t] = boundary_f_measure(gt == k, pred == k, void, bound_th)
    frames = tuple(p.stem for p in evaluated)
    return [ObjectScores(sequence, k + 1, frames, j[k], f[k]) for k in range(n_obj)]


def evaluate_objects(
    davis_root: str | Path,
    results_dir: str | Path,
    sequences: Iterable[str],
    exclude_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> list[ObjectScores]:
    """`score_sequence` over several sequences (with a progress bar), objects in order."""
    scores: list[ObjectScores] = []
    for name in tqdm(list(sequences), desc="davis eval", unit="seq"):
        scores.extend(score_sequence(davis_root, results_dir, name, exclude_void, bound_th))
    return scores


def summarize(scores: list[ObjectScores]) -> dict[str, float]:
    """The benchmark's summary: each statistic averaged over all objects (percent).

    Returns:
        {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
        "n_sequences", "n_objects"}.
    """
    if not scores:
        raise DavisLayoutError("no object to evaluate (every first annotation is empty)")
    summary = {key: float(np.mean([s.statistics[key] for s in scores])) for key in SUMMARY_KEYS if key != "J&F-Mean"}
    summary["J&F-Mean"] = (summary["J-Mean"] + summary["F-Mean"]) / 2
    summary["n_sequences"] = float(len({s.sequence for s in scores}))
    summary["n_objects"] = float(len(scores))
    return summary


def evaluate(
    davis_root: str | Path,
    results_dir: str | Path,
    sequences: Iterable[str],
    exclude_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> dict[str, float]:
    """Score a DAVIS-2017 results folder (semi-supervised protocol).

    Args:
        davis_root: the DAVIS root (Annotations/480p/<seq>/*.png).
        results_dir: <results_dir>/<seq>/<frame>.png palette PNGs of object ids.
        sequences: the sequence names to score (e.g. those of ImageSets/2017/val.txt).
        exclude_void: leave void (255) pixels out of J and F (default: count them as background).
        bound_th: F's boundary tolerance (0.008 of the diagonal, as the toolkit).

    Returns:
        Flat dict of percentages: "J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean",
        "F-Recall", "F-Decay", plus "n_sequences" and "n_objects" (counts).

    Raises:
        DavisLayoutError: see `score_sequence`.
    """
    return summarize(evaluate_objects(davis_root, results_dir, sequences, exclude_void, bound_th))
