"""Copy detection on Copydays (paper Table 4; the reference's eval_copy_detection.py, scored as
the INRIA Holidays/Copydays evaluation package does).

Layout read (Copydays, Douze et al. 2009)::

    <root>/original/*.jpg          the 157 originals: the database (plus optional distractors)
    <root>/strong/*.jpg            229 strong attacks (crops, blur, print-and-scan, paint, ...)
    <root>/jpegqual/<q>/*.jpg      each original re-encoded at JPEG quality q
    <root>/crops/<c>/*.jpg         each original with c% of its surface cropped away

File names carry the ground truth: the first 4 characters are the block id, so a query's positive
is the original whose name shares them (200000.jpg original; 200001.jpg, 200002.jpg its strong
attacks; jpegqual/30/200000.jpg the same image at quality 30). The reference uses this rule for
``strong`` and the 1:1 file-order mapping for the other blocks; on Copydays (one original per
block id) the two agree, and the prefix rule also holds when a block lacks some files. With
``copydetect.root: null`` the stage writes the generated fixture (`stages.fixtures.copydays`) to
``copydetect.fixture`` and evaluates on it.

Descriptor, as the reference: each image resized to ``imsize x imsize`` (bicubic), ImageNet-
normalised; the last block's final-norm tokens give [CLS ‖ GeM(p=4) of the patch tokens], 2D
dims. Optional whitening learned on a separate image folder: subtract that set's mean feature,
project on its covariance's eigenvectors scaled by eigenvalue^-0.5 (eigenvalues floored at
1e-5 x the largest, as the reference's PCA). That matrix is, as in the reference, the uncentred
second-moment matrix of the learning set (``copydetect.whitening_centred: true``: the covariance
of the centred features, PCA whitening proper, which the paper's numbers do not use).
Descriptors are then L2-normalised and the ``topk`` (20) most cosine-similar database images are
retrieved per query.

Score: per query, average precision over those top-k results (`score_ap_from_ranks`: trapezoids
over recall, the Holidays package's score_ap_from_ranks_1); mAP per block (``original``,
``strong``, ``jpegqual/<q>``, ``crops/<c>``) in percent, to ``<paths.metrics>/copydetect.json``
as ``<block>_mAP`` (``jpegqual_30_mAP``, ...) and ``mAP`` = the ``strong`` block's (the paper's
headline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.device import resolve_device
from stages.params import Params
from stages.retrieval import list_images, load_rgb_teacher, open_rgb

logger = logging.getLogger(__name__)

PREFIX_LENGTH = 4
TOP_K = 20
EIGENVALUE_FLOOR = 1e-5  # relative to the largest eigenvalue (the reference's utils.PCA)
WHITENING_POWER = 0.5
_SHOWN = 5


# ---------------------------------------------------------------------------------------------
# Scoring


def score_ap_from_ranks(ranks: Sequence[int], n_positives: int) -> float:
    """Average precision of one search (the Holidays package's score_ap_from_ranks_1).

    Trapezoids in the precision-recall plot: the i-th true positive found (0-based, ``ntp`` found
    before it) at 0-based rank r adds recall 1/n_positives times the mean of the precision before
    it (ntp / r, or 1 at rank 0) and after it ((ntp + 1) / (r + 1)).

    Args:
        ranks: increasing 0-based ranks at which the positives were retrieved.
        n_positives: positives of the query in the database (> 0).
    """
    if n_positives <= 0:
        raise ValueError(f"n_positives must be > 0, got {n_positives}")
    ap = 0.0
    step = 1.0 / n_positives
    for ntp, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else ntp / float(rank)
        precision_1 = (ntp + 1) / float(rank + 1)
        ap += (precision_0 + precision_1) * step / 2.0
    return ap


def mean_ap(retrieved: np.ndarray, positives: Sequence[Sequence[int]]) -> float:
    """Mean over queries of `score_ap_from_ranks` on their retrieved lists.

    Args:
        retrieved: (n_queries, k) database indices, best first.
        positives: per query, the database indices of its positives (non-empty).

    Returns:
        mAP as a fraction.
    """
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or retrieved.shape[0] != len(positives):
        raise ValueError(f"retrieved must be (n_queries = {len(positives)}, k), got shape {retrieved.shape}")
    if not len(positives):
        raise ValueError("no queries")
    total = 0.0
    for row, pos in zip(retrieved, positives):
        wanted = set(int(p) for p in pos)
        ranks = [rank for rank, index in enumerate(row.tolist()) if index in wanted]
        total += score_ap_from_ranks(ranks, len(wanted))
    return total / len(positives)


# ---------------------------------------------------------------------------------------------
# The dataset layout


@dataclass(frozen=True)
class Copydays:
    """The Copydays files: `blocks` maps a block name ("original", "strong", "jpegqual/30",
    "crops/50", ...) to its sorted image files; `originals` is ``blocks["original"]``."""

    root: Path
    blocks: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def originals(self) -> list[Path]:
        return self.blocks["original"]


def _jpgs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".jpg"))


def _numeric_first(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def read_copydays(root: str | Path) -> Copydays:
    """List the Copydays blocks under `root` (``*.jpg`` files, as the reference).

    ``original`` and ``strong`` are required; every ``jpegqual/<q>`` and ``crops/<c>`` folder
    present becomes a block (numeric order).

    Raises:
        StageError: a missing or empty required folder, an empty block, or a query whose first
            4 characters match no original (naming the folder or the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"{root}: no such directory (expected the Copydays layout original/, strong/, "
                         "jpegqual/<q>/, crops/<c>/)")
    blocks: dict[str, list[Path]] = {}
    for required in ("original", "strong"):
        folder = root / required
        if not folder.is_dir():
            raise StageError(f"{folder}: missing (the Copydays layout needs {root}/original and {root}/strong)")
        blocks[required] = _jpgs(folder)
        if not blocks[required]:
            raise StageError(f"{folder}: holds no .jpg files")
    for group in ("jpegqual", "crops"):
        parent = root / group
        if not parent.is_dir():
            continue
        for sub in sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: _numeric_first(p.name)):
            files = _jpgs(sub)
            if not files:
                raise StageError(f"{sub}: holds no .jpg files")
            blocks[f"{group}/{sub.name}"] = files
    data = Copydays(root, blocks)
    prefixes = {p.name[:PREFIX_LENGTH] for p in data.originals}
    for name, files in blocks.items():
        orphans = [f for f in files if f.name[:PREFIX_LENGTH] not in prefixes]
        if orphans:
            shown = ", ".join(str(f) for f in orphans[:_SHOWN])
            raise StageError(f"{root}: {len(orphans)} {name} image(s) share their first {PREFIX_LENGTH} "
                             f"characters with no original: {shown}")
    return data


def positives_by_prefix(queries: Sequence[Path | str], originals: Sequence[Path | str]) -> list[list[int]]:
    """Per query, the indices of the originals whose file name has the same first 4 characters."""
    names = [Path(o).name[:PREFIX_LENGTH] for o in originals]
    return [[j for j, n in enumerate(names) if n == Path(q).name[:PREFIX_LENGTH]] for q in queries]


# ---------------------------------------------------------------------------------------------
# Descriptors


def copy_transform(imsize: int) -> transforms.Compose:
    """The reference's transform: bicubic resize to (imsize, imsize), ToTensor, ImageNet norm."""
    from stages.dino.augment import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.Resize((imsize, imsize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CopyImages(Dataset):
    """Item i: ``copy_transform(imsize)(open_rgb(paths[i]))``, a (3, imsize, imsize) tensor."""

    def __init__(self, paths: Sequence[Path], imsize: int):
        self.paths, self.transform = list(paths), copy_transform(imsize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[index]))


def copy_descriptor(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[CLS ‖ GeM(p=4) of the patch tokens] of the last block (final norm), as the reference.

    Args:
        backbone: a ViT with ``get_intermediate_layers``.
        images: (B, 3, H, W), H and W multiples of the patch size.

    Returns:
        (B, 2D) float32.
    """
    from stages.extract import gem_pool

    tokens = backbone.get_intermediate_layers(images, 1)[-1].float()
    return torch.cat([tokens[:, 0], gem_pool(tokens[:, 1:])], dim=1)


@torch.no_grad()
def copy_features(backbone: nn.Module, paths: Sequence[Path], imsize: int, *, batch_size: int = 128,
                  num_workers: int = 0, device: str | torch.device = "cpu", desc: str = "features") -> torch.Tensor:
    """`copy_descriptor` of every image (not normalised), (N, 2D) float32 on the CPU."""
    device = torch.device(device)
    backbone = backbone.eval().to(device)
    loader = DataLoader(CopyImages(paths, imsize), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = [copy_descriptor(backbone, images.to(device)).cpu()
             for images in tqdm(loader, desc=desc, unit="batch", total=len(loader))]
    return torch.cat(feats)


@dataclass(frozen=True)
class Whitening:
    """PCA whitening learned on a feature set: ``apply(x) = (x - mean) @ projection.T``.

    Attributes:
        mean: (D,) mean of the learning set.
        projection: (D, D) rows = eigenvectors of its second-moment (or covariance) matrix,
            decreasing eigenvalue, each divided by eigenvalue^power.
    """

    mean: torch.Tensor
    projection: torch.Tensor

    @classmethod
    def learn(cls, features: torch.Tensor, power: float = WHITENING_POWER,
              floor: float = EIGENVALUE_FLOOR, centred: bool = False) -> "Whitening":
        """Fit on (N, D) features: the eigen-decomposition (float64) of their second-moment matrix
        X^T X / N, as the reference, or with `centred` of their covariance; eigenvalues floored at
        ``floor`` x the largest, projection ``diag(eig^-power) V^T``."""
        x = features.double()
        mean = x.mean(dim=0)
        basis = x - mean if centred else x
        cov = basis.T @ basis / max(1, x.shape[0])
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=float(eigenvalues.max()) * floor)
        order = torch.argsort(eigenvalues, descending=True)
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        projection = eigenvectors.T / eigenvalues.pow(power)[:, None]
        return cls(mean.float(), projection.float())

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D) whitened (not normalised)."""
        return (features.float() - self.mean) @ self.projection.T


def search(database: torch.Tensor, queries: torch.Tensor, k: int = TOP_K) -> np.ndarray:
    """The k most cosine-similar database rows per query (L2-normalised here), best first.

    Returns:
        (n_queries, min(k, n_db)) int64 database indices.
    """
    database = F.normalize(database.float(), dim=1, p=2)
    queries = F.normalize(queries.float(), dim=1, p=2)
    similarity = queries @ database.T
    return similarity.topk(min(k, database.shape[0]), dim=1, largest=True, sorted=True).indices.numpy()


# ---------------------------------------------------------------------------------------------
# The stage


def evaluate_copydays(
    backbone: nn.Module,
    data: Copydays,
    *,
    imsize: int = 320,
    topk: int = TOP_K,
    distractors: Sequence[Path] = (),
    whitening: Sequence[Path] = (),
    whitening_centred: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Descriptors, optional whitening, top-k search and per-block mAP (percent).

    Returns:
        ``<block>_mAP`` per block ("/" -> "_"), ``mAP`` (= ``strong_mAP``), ``n_database``.
    """
    def feats(paths: Sequence[Path], desc: str) -> torch.Tensor:
        return copy_features(backbone, paths, imsize, batch_size=batch_size, num_workers=num_workers,
                             device=device, desc=desc)

    database = feats(data.originals, "original")
    if distractors:
        database = torch.cat([database, feats(distractors, "distractors")])
    block_feats = {name: (database[: len(data.originals)] if name == "original" else feats(files, name))
                   for name, files in data.blocks.items()}
    if whitening:
        white = Whitening.learn(feats(whitening, "whitening"), centred=whitening_centred)
        database = white.apply(database)
        block_feats = {name: white.apply(f) for name, f in block_feats.items()}
    metrics: dict[str, float] = {}
    for name, files in data.blocks.items():
        retrieved = search(database, block_feats[name], topk)
        value = mean_ap(retrieved, positives_by_prefix(files, data.originals))
        metrics[f"{name.replace('/', '_')}_mAP"] = round(100.0 * value, 4)
        logger.info("copydays %s: mAP %.2f (%d queries)", name, 100.0 * value, len(files))
    metrics["mAP"] = metrics["strong_mAP"]
    metrics["n_database"] = float(database.shape[0])
    return metrics


def dataset_root(params: Params) -> Path:
    """``copydetect.root``, or (when null) the fixture, regenerated into ``copydetect.fixture``."""
    cfg = params.copydetect
    if cfg.root is not None:
        return Path(cfg.root)
    from stages.fixtures.copydays import make_fixture

    logger.info("copydetect.root is null: evaluating on the generated fixture in %s", cfg.fixture)
    return make_fixture(cfg.fixture)


def run(params: Params) -> dict[str, float]:
    """Stage `copydetect`: Copydays mAP per block of the teacher's copy descriptors.

    Layout, folders, params and checkpoint are checked before any feature is computed; the
    metrics are written to ``<paths.metrics>/copydetect.json``.
    """
    cfg = params.copydetect
    if params.model.arch == "resnet50":
        raise StageError("copydetect needs a ViT (its descriptor pools the patch tokens); model.arch = 'resnet50'")
    if cfg.imsize % params.model.patch_size:
        raise StageError(f"copydetect.imsize = {cfg.imsize} is not a multiple of model.patch_size = "
                         f"{params.model.patch_size}")
    data = read_copydays(dataset_root(params))
    distractors = list_images(cfg.distractors, "copydetect.distractors") if cfg.distractors else []
    whitening = list_images(cfg.whitening, "copydetect.whitening") if cfg.whitening else []
    device = resolve_device(cfg.device, "copydetect.device")
    backbone = load_rgb_teacher(params)
    metrics = evaluate_copydays(
        backbone, data, imsize=cfg.imsize, topk=cfg.topk, distractors=distractors, whitening=whitening,
        whitening_centred=cfg.whitening_centred, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device,
    )
    write_json(Path(params.paths.metrics) / "copydetect.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("copydetect", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
