"""Stage `shard`: a source dataset -> deterministic WebDataset shards + manifest.json.

``python -m stages.shard [--params params.yaml]`` reads ``dataset.*`` and writes
``paths.shards/{train,val}-NNNNNN.tar`` and ``manifest.json`` (the whole folder atomically: a failed
run leaves the previous output untouched) and ``paths.metrics/shard.json``.

Order and content depend only on the params: the optional subset is stratified per class with
``dataset.seed`` and keeps the source order; keys are ``<split>_<source index>``; images are encoded
without metadata at fixed settings (JPEG files pass through when ``image_format`` is jpg), so a
rerun gives byte-identical shards, with or without ``dataset.num_workers``.

Unreadable source images (ImageFolder) are logged with their path and skipped; when more than
``dataset.max_bad_fraction`` of the selected images are bad, the stage fails and writes nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from stages.atomic import atomic_dir, write_json, write_text
from stages.cli import StageError, run_stage
from stages.params import Params
from stages.shard_format import FORMAT_VERSION, MANIFEST_NAME, Sample, encode_image, manifest_json, write_split
from stages.sources import SPLITS, BadImageError, Source, Split, open_source, sample_key, stratified_subset

logger = logging.getLogger(__name__)

_SHOWN_BAD = 5  # bad files named in the failure message

# One (source, image_format, jpeg_quality) per worker process, set by _init_worker.
_worker_state: tuple[Source, str, int] | None = None


def _init_worker(source: Source, image_format: str, jpeg_quality: int) -> None:
    global _worker_state
    _worker_state = (source, image_format, jpeg_quality)


def _prepare(source: Source, image_format: str, jpeg_quality: int, split: Split, index: int) -> tuple:
    """Load and encode one image: ("ok", image bytes, ext) or ("bad", location, reason)."""
    try:
        image = source.load(split, index)
    except BadImageError as exc:
        return ("bad", exc.location, exc.reason)
    if isinstance(image, bytes):  # passed through unchanged: the source only does so for jpg
        return ("ok", image, "jpg")
    return ("ok", encode_image(image, image_format, jpeg_quality), image_format)  # type: ignore[arg-type]


def _prepare_in_worker(task: tuple[Split, int]) -> tuple:
    if _worker_state is None:
        raise RuntimeError("worker not initialised")
    return _prepare(*_worker_state, *task)


class _BadImages:
    """Counts skipped images and fails as soon as their share exceeds the allowed fraction."""

    def __init__(self, planned: int, max_fraction: float) -> None:
        self.planned = planned
        self.max_fraction = max_fraction
        self.items: list[tuple[str, str]] = []

    def add(self, location: str, reason: str) -> None:
        logger.warning("skipping unreadable image %s (%s)", location, reason)
        self.items.append((location, reason))
        self.check()

    def check(self) -> None:
        if self.planned and len(self.items) > self.max_fraction * self.planned:
            shown = "; ".join(f"{loc} ({why})" for loc, why in self.items[:_SHOWN_BAD])
            more = f"; and {len(self.items) - _SHOWN_BAD} more" if len(self.items) > _SHOWN_BAD else ""
            raise StageError(
                f"{len(self.items)} of {self.planned} selected images are unreadable "
                f"(fraction {len(self.items) / self.planned:.4f} > dataset.max_bad_fraction = "
                f"{self.max_fraction}): {shown}{more}"
            )


def _samples(
    results: Iterator[tuple],
    split: Split,
    indices: np.ndarray,
    total: int,
    labels: np.ndarray,
    bad: _BadImages,
) -> Iterator[Sample]:
    bar = tqdm(zip(indices, results), total=len(indices), desc=f"shard {split}", unit="img", mininterval=1.0)
    for index, result in bar:
        if result[0] == "bad":
            bad.add(result[1], result[2])
            continue
        yield Sample(key=sample_key(split, int(index), total), image=result[1], ext=result[2], label=int(labels[index]))


def run(params: Params) -> dict:
    """Write the shards of train and val, the manifest and metrics/shard.json.

    Returns:
        The metrics: ``{"train_images", "val_images", "train_shards", "val_shards", "train_bytes",
        "val_bytes", "bad_images", "classes"}``.

    Raises:
        StageError: the source is missing or malformed, the train split is empty, or too many
            images are unreadable (nothing is written then).
    """
    ds = params.dataset
    source = open_source(ds)
    classes = source.classes()
    selection: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        labels = source.labels(split)
        wanted = ds.subset.get(split)
        if wanted is not None and wanted > len(labels):
            logger.warning("dataset.subset.%s = %d but the source has only %d images: using all", split, wanted, len(labels))
        selection[split] = (labels, stratified_subset(labels, wanted, ds.seed))
        logger.info("%s: %d of %d images selected", split, len(selection[split][1]), len(labels))
    bad = _BadImages(sum(len(ix) for _, ix in selection.values()), ds.max_bad_fraction)

    out = Path(params.paths.shards)
    splits: dict[str, dict[str, Any]] = {}
    pool = None
    if ds.num_workers > 0:
        # fork: workers inherit the loaded source without pickling it
        context = multiprocessing.get_context("fork")
        pool = context.Pool(ds.num_workers, initializer=_init_worker, initargs=(source, ds.image_format, ds.jpeg_quality))
    try:
        with atomic_dir(out) as tmp:
            for split in SPLITS:
                labels, indices = selection[split]
                tasks = [(split, int(i)) for i in indices]
                if pool is not None:
                    results = pool.imap(_prepare_in_worker, tasks, chunksize=64)
                else:
                    results = (_prepare(source, ds.image_format, ds.jpeg_quality, *t) for t in tasks)
                entries = write_split(
                    _samples(results, split, indices, len(labels), labels, bad),
                    tmp,
                    split,
                    ds.shard_max_samples,
                    ds.shard_max_bytes,
                )
                splits[split] = {"total": sum(e["count"] for e in entries), "shards": entries}
                logger.info("%s: %d samples in %d shards", split, splits[split]["total"], len(entries))
            if splits["train"]["total"] == 0:
                raise StageError(f"the train split of {source.describe()} is empty")
            if splits["val"]["total"] == 0:
                logger.warning("the val split is empty")
            manifest = {
                "format": FORMAT_VERSION,
                "source": {
                    **source.describe(),
                    "subset": {split: ds.subset.get(split) for split in SPLITS},
                    "seed": ds.seed,
                    "image_format": ds.image_format,
                    "skipped": [loc for loc, _ in bad.items],
                },
                "classes": classes,
                "splits": splits,
            }
            write_text(tmp / MANIFEST_NAME, manifest_json(manifest))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    metrics = {
        "classes": len(classes),
        "bad_images": len(bad.items),
        **{f"{split}_images": splits[split]["total"] for split in SPLITS},
        **{f"{split}_shards": len(splits[split]["shards"]) for split in SPLITS},
        **{f"{split}_bytes": sum(e["bytes"] for e in splits[split]["shards"]) for split in SPLITS},
    }
    write_json(Path(params.paths.metrics) / "shard.json", metrics)
    logger.info("wrote %s: %s", out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("shard", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
