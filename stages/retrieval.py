"""Image retrieval on Revisited Oxford and Paris (paper Table 3; the reference's
eval_image_retrieval.py, scored with revisitop's evaluation, Radenović et al. 2018).

Layout read (revisitop's ``data/datasets``)::

    <root>/<roxford5k|rparis6k>/gnd_<name>.pkl   {"imlist", "qimlist", "gnd"}
    <root>/<roxford5k|rparis6k>/jpg/<image>.jpg

``gnd[i]`` holds query i's ``easy``, ``hard`` and ``junk`` index lists into ``imlist`` and its
``bbx`` (x1, y1, x2, y2). With ``retrieval.root: null`` the stage writes the generated fixture
(`stages.fixtures.retrieval`) to ``retrieval.fixture`` and evaluates on it.

Features, as the reference: every image is converted to RGB and shrunk with PIL's
``thumbnail((imsize, imsize), LANCZOS)`` (longer side ``imsize``, aspect kept; like the reference,
smaller images are not enlarged), ImageNet-normalised, and fed alone (batch 1, no crop) to the
frozen teacher; a ViT sees the image cut at the bottom/right to a multiple of its patch size (what
the reference's stride-p patch convolution does). The feature is the final-norm CLS token, or with
``multiscale`` its average over scales 1, 1/sqrt(2), 1/2 (`stages.extract.pool_features`), then
L2-normalised. Queries are the full images by default (``crop_queries: false``, as the reference);
``crop_queries: true`` crops them to ``bbx`` first (revisitop's protocol). An optional distractor
folder (e.g. R1M) is appended to every database.

Ranking is by cosine similarity (ties keep database order). Scoring (`compute_map`): Medium
protocol = positives easy + hard, junk = junk; Hard = positives hard, junk = junk + easy.
Metrics (percent) go to ``<paths.metrics>/retrieval.json``: ``<dataset>_<M|H>_mAP`` and
``<dataset>_<M|H>_mP@<k>`` for k in ``retrieval.kappas``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.device import resolve_device
from stages.params import Params

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("roxford5k", "rparis6k")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PROTOCOLS: dict[str, str] = {"M": "medium", "H": "hard"}
_SHOWN = 5


# ---------------------------------------------------------------------------------------------
# Scoring (revisitop's compute_ap / compute_map)


def compute_ap(positions: np.ndarray, n_positives: int) -> float:
    """Average precision of one query by the trapezoid rule over recall (revisitop's compute_ap).

    Each positive found moves recall up by 1/n_positives; the area added is that step times the
    mean of the precision just before it (j / r, or 1 at rank 0) and just after it
    ((j + 1) / (r + 1)), where j positives precede it and r is its 0-based position.

    Args:
        positions: sorted 0-based positions of the positives found (junk already removed).
        n_positives: number of positives of the query (> 0); positives never found add nothing.
    """
    ap = 0.0
    step = 1.0 / n_positives
    for j, rank in enumerate(np.asarray(positions).tolist()):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * step / 2.0
    return ap


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and mean precision at k of a ranking (revisitop's compute_map).

    Junk images are removed from each ranked list before positions are counted. Precision at k
    follows revisitop exactly: with 1-based positions p of the positives (junk removed),
    ``kq = min(max(p), k)`` and ``P@k = #{p <= kq} / kq`` -- so a query whose last positive comes
    before rank k is not penalised for the ranks after it. A query without positives has AP and
    P@k NaN and is left out of both means.

    Args:
        ranks: (n_db, n_queries) integer array; column j lists database indices for query j, best
            first.
        gnd: n_queries mappings with "ok" (positive indices) and optionally "junk".
        kappas: the k of the P@k.

    Returns:
        ``(mAP, APs (n_queries,), mP@k (len(kappas),), P@k (n_queries, len(kappas)))``, as
        fractions in [0, 1] (NaN where no query has positives).

    Raises:
        ValueError: ranks is not 2-D or its number of columns is not len(gnd).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, n_queries) with n_queries = len(gnd) = {len(gnd)}, "
                         f"got shape {ranks.shape}")
    kappas = [int(k) for k in kappas]
    n_queries = len(gnd)
    aps = np.zeros(n_queries)
    prs = np.zeros((n_queries, len(kappas)))
    valid = np.zeros(n_queries, dtype=bool)
    for i, query in enumerate(gnd):
        ok = np.asarray(query["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            aps[i] = np.nan
            prs[i] = np.nan
            continue
        valid[i] = True
        junk = np.asarray(query.get("junk", []), dtype=np.int64).ravel()
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        pos = pos - np.searchsorted(junk_pos, pos, side="left")  # junk ranked before each positive
        aps[i] = compute_ap(pos, ok.size)
        one_based = pos + 1
        for j, k in enumerate(kappas):
            if one_based.size == 0:
                prs[i, j] = 0.0
                continue
            kq = min(int(one_based.max()), k)
            prs[i, j] = np.count_nonzero(one_based <= kq) / kq
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: Literal["easy", "medium", "hard"]) -> list[dict]:
    """revisitop's ground truth per protocol, as ``[{"ok": ..., "junk": ...}]``.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk;
    hard: ok = hard, junk = junk + easy.
    """
    parts = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    if protocol not in parts:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: easy, medium, hard")
    ok_keys, junk_keys = parts[protocol]

    def cat(query: Mapping[str, Any], keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(query[k], dtype=np.int64).ravel() for k in keys])

    return [{"ok": cat(q, ok_keys), "junk": cat(q, junk_keys)} for q in gnd]


# ---------------------------------------------------------------------------------------------
# The dataset layout


@dataclass(frozen=True)
class RevisitedDataset:
    """One Revisited Oxford/Paris dataset as read from disk.

    Attributes:
        name: "roxford5k" or "rparis6k" (the folder name).
        folder: ``<root>/<name>``.
        imlist: database image names (no extension), in index order.
        qimlist: query image names.
        gnd: per query ``{"easy", "hard", "junk", "bbx", ...}``, as in the pickle.
    """

    name: str
    folder: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]

    def image_path(self, image: str) -> Path:
        return self.folder / "jpg" / f"{image}.jpg"

    @property
    def database_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    @property
    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [tuple(float(v) for v in q["bbx"]) for q in self.gnd]  # type: ignore[misc]


def _missing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if not p.is_file()]


def load_revisited(root: str | Path, name: str, need_bbx: bool = False) -> RevisitedDataset:
    """Read and check ``<root>/<name>/gnd_<name>.pkl`` and that every image it names exists.

    Raises:
        StageError: a missing or unreadable pickle, missing keys, indices out of range, a missing
            bbx (when `need_bbx`), or missing images -- naming the file and what is wrong.
    """
    folder = Path(root) / name
    gnd_file = folder / f"gnd_{name}.pkl"
    if not gnd_file.is_file():
        raise StageError(f"{gnd_file}: missing (expected the revisitop layout "
                         f"<root>/{name}/gnd_{name}.pkl and <root>/{name}/jpg/*.jpg)")
    try:
        with open(gnd_file, "rb") as handle:
            cfg = pickle.load(handle)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise StageError(f"{gnd_file}: cannot read the ground-truth pickle: {exc}") from exc
    if not isinstance(cfg, Mapping) or any(k not in cfg for k in ("imlist", "qimlist", "gnd")):
        found = sorted(cfg) if isinstance(cfg, Mapping) else type(cfg).__name__
        raise StageError(f"{gnd_file}: expected a dict with imlist, qimlist and gnd; found {found}")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise StageError(f"{gnd_file}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    if not imlist or not qimlist:
        raise StageError(f"{gnd_file}: no database images or no queries")
    required = ("easy", "hard", "junk") + (("bbx",) if need_bbx else ())
    for i, query in enumerate(gnd):
        absent = [k for k in required if k not in query]
        if absent:
            hint = " (needed by retrieval.crop_queries: true)" if absent == ["bbx"] else ""
            raise StageError(f"{gnd_file}: gnd[{i}] (query {qimlist[i]!r}) lacks {', '.join(absent)}{hint}")
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(query[key], dtype=np.int64).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= len(imlist)):
                raise StageError(f"{gnd_file}: gnd[{i}][{key!r}] has indices outside 0..{len(imlist) - 1}")
        if need_bbx and len(query["bbx"]) != 4:
            raise StageError(f"{gnd_file}: gnd[{i}]['bbx'] must be [x1, y1, x2, y2], got {query['bbx']!r}")
    dataset = RevisitedDataset(name, folder, [str(n) for n in imlist], [str(n) for n in qimlist], gnd)
    missing = _missing(dataset.database_paths + dataset.query_paths)
    if missing:
        shown = ", ".join(str(p) for p in missing[:_SHOWN])
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise StageError(f"{gnd_file}: {len(missing)} image(s) it names are missing: {shown}{more}")
    return dataset


def list_images(folder: str | Path, what: str) -> list[Path]:
    """Image files (by extension) under `folder`, recursively, in sorted path order.

    Args:
        folder: the folder to list.
        what: the params key it came from, for the error message.

    Raises:
        StageError: the folder is missing or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{what} = {str(folder)!r}: no such directory")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise StageError(f"{what} = {str(folder)!r}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


# ---------------------------------------------------------------------------------------------
# Features


@contextlib.contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """The reference sets PIL's LOAD_TRUNCATED_IMAGES (a few benchmark JPEGs are truncated)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB.

    Raises:
        StageError: the file cannot be read or decoded (the message names it).
    """
    try:
        with _truncated_images_allowed(), Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as exc:
        raise StageError(f"{path}: cannot decode image: {exc}") from exc


def retrieval_image(path: str | Path, imsize: int, bbx: Sequence[float] | None = None) -> torch.Tensor:
    """One image as the reference feeds it: RGB, optionally cropped to `bbx`, thumbnail to
    ``imsize`` (LANCZOS), ImageNet-normalised.

    Returns:
        (3, H, W) float32 with max(H, W) <= imsize.
    """
    from stages.dino.augment import normalize

    img = open_rgb(path)
    if bbx is not None:
        img = img.crop(tuple(float(v) for v in bbx))
    img.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
    return normalize()(img)


class RetrievalImages(Dataset):
    """Images for `image_features`: item i is ``retrieval_image(paths[i], imsize, boxes[i])``."""

    def __init__(self, paths: Sequence[Path], imsize: int, boxes: Sequence[Sequence[float]] | None = None):
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
        self.paths, self.imsize, self.boxes = list(paths), imsize, boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        box = None if self.boxes is None else self.boxes[index]
        return retrieval_image(self.paths[index], self.imsize, box)


@torch.no_grad()
def image_features(
    backbone: nn.Module,
    paths: Sequence[Path],
    imsize: int,
    *,
    multiscale: bool = False,
    boxes: Sequence[Sequence[float]] | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> torch.Tensor:
    """L2-normalised global features of images of any size, one forward pass per image.

    Args:
        backbone: maps (1, 3, H, W) to (1, D); a ViT (with ``patch_size``) gets the image cut to
            a multiple of the patch size at the bottom/right.
        paths: image files.
        imsize: longer side after the thumbnail.
        multiscale: average the CLS over scales 1, 1/sqrt(2), 1/2 (`pool_features`).
        boxes: per-image crop boxes (x1, y1, x2, y2) applied before resizing, or None.
        device: where the backbone runs (fp32, as the reference).
        num_workers: image-decoding processes.
        desc: progress-bar label.

    Returns:
        (N, D) float32 on the CPU, rows of unit norm.

    Raises:
        StageError: an undecodable image, or one smaller than a patch after resizing.
    """
    from stages.extract import MULTISCALE_SCALES, pool_features

    device = torch.device(device)
    backbone = backbone.eval().to(device)
    patch = int(getattr(backbone, "patch_size", 1) or 1)
    smallest = min(MULTISCALE_SCALES) if multiscale else 1.0  # the scale whose image must still hold a patch
    loader = DataLoader(RetrievalImages(paths, imsize, boxes), batch_size=1, shuffle=False,
                        num_workers=num_workers)
    feats = []
    for index, images in enumerate(tqdm(loader, desc=desc, unit="img", total=len(paths))):
        height, width = images.shape[-2] // patch * patch, images.shape[-1] // patch * patch
        if int(min(images.shape[-2:]) * smallest) < patch:
            at_scale = f" (at scale {smallest} of the multiscale descriptor)" if multiscale else ""
            raise StageError(f"{paths[index]}: {images.shape[-1]}x{images.shape[-2]} after resizing to "
                             f"imsize {imsize} is smaller than the patch size {patch}{at_scale}")
        images = images.to(device)
        if multiscale:
            out = pool_features(backbone, images, "multiscale")
        else:
            out = backbone(images[..., :height, :width])
        feats.append(F.normalize(out.float(), dim=1, p=2).cpu())
    return torch.cat(feats)


def rank_database(database: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Database indices by decreasing cosine similarity, per query (ties keep database order).

    Args:
        database: (n_db, D) L2-normalised.
        queries: (n_q, D) L2-normalised.

    Returns:
        (n_db, n_q) int64: column j is query j's ranking.
    """
    similarity = database.float() @ queries.float().T
    return torch.argsort(-similarity, dim=0, stable=True).numpy()


def score_revisited(dataset_name: str, ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]],
                    kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Medium and Hard mAP / mP@k of a ranking, in percent, keyed ``<dataset>_<M|H>_<metric>``."""
    metrics: dict[str, float] = {}
    for short, protocol in PROTOCOLS.items():
        mean_ap, _, mean_pr, _ = compute_map(ranks, protocol_gnd(gnd, protocol), kappas)  # type: ignore[arg-type]
        metrics[f"{dataset_name}_{short}_mAP"] = round(100.0 * mean_ap, 4)
        for k, value in zip(kappas, mean_pr):
            metrics[f"{dataset_name}_{short}_mP@{k}"] = round(100.0 * float(value), 4)
    return metrics


def evaluate_dataset(
    backbone: nn.Module,
    dataset: RevisitedDataset,
    *,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    kappas: Sequence[int] = (1, 5, 10),
    distractors: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Features of one dataset's database and queries, cosine ranking, Medium/Hard scores.

    Args:
        backbone: the frozen model (any module mapping (1, 3, H, W) to (1, D)).
        dataset: from `load_revisited`.
        imsize, multiscale: see `image_features`.
        crop_queries: crop each query to its ``bbx`` first (revisitop protocol).
        kappas: the k of mP@k.
        distractors: (n_distractors, D) L2-normalised features appended to the database.
        device, num_workers: see `image_features`.

    Returns:
        ``<name>_<M|H>_mAP``, ``<name>_<M|H>_mP@<k>`` (percent) and the database/query counts.
    """
    database = image_features(backbone, dataset.database_paths, imsize, multiscale=multiscale,
                              device=device, num_workers=num_workers, desc=f"{dataset.name} database")
    queries = image_features(backbone, dataset.query_paths, imsize, multiscale=multiscale,
                             boxes=dataset.query_boxes if crop_queries else None, device=device,
                             num_workers=num_workers, desc=f"{dataset.name} queries")
    if distractors is not None and len(distractors):
        database = torch.cat([database, distractors])
    ranks = rank_database(database, queries)
    metrics = score_revisited(dataset.name, ranks, dataset.gnd, kappas)
    metrics[f"{dataset.name}_n_database"] = float(database.shape[0])
    metrics[f"{dataset.name}_n_queries"] = float(queries.shape[0])
    logger.info("%s: mAP M %.2f H %.2f", dataset.name, metrics[f"{dataset.name}_M_mAP"],
                metrics[f"{dataset.name}_H_mAP"])
    return metrics


# ---------------------------------------------------------------------------------------------
# The stage


def load_rgb_teacher(params: Params) -> nn.Module:
    """The frozen teacher backbone (`stages.dino.checkpoint.load_teacher`), for RGB images.

    Raises:
        StageError: a missing file, RGB-incompatible ``model.in_chans``, or a checkpoint that does
            not match the model.
    """
    from stages.dino.checkpoint import load_teacher, teacher_path

    teacher_path(params)
    if params.model.in_chans != 3:
        raise StageError(f"model.in_chans = {params.model.in_chans}: the benchmark images are RGB (3 channels)")
    return load_teacher(params)


def dataset_root(params: Params) -> Path:
    """``retrieval.root``, or (when null) the fixture, regenerated into ``retrieval.fixture``."""
    cfg = params.retrieval
    if cfg.root is not None:
        root = Path(cfg.root)
        if not root.is_dir():
            raise StageError(f"retrieval.root = {cfg.root!r}: no such directory (it must hold "
                             f"{' and '.join(cfg.datasets)})")
        return root
    from stages.fixtures.retrieval import make_fixture

    logger.info("retrieval.root is null: evaluating on the generated fixture in %s", cfg.fixture)
    return make_fixture(cfg.fixture, datasets=cfg.datasets)


def run(params: Params) -> dict[str, float]:
    """Stage `retrieval`: Revisited Oxford/Paris mAP and mP@k of the teacher's features.

    Everything is checked (layout, images, checkpoint) before features are computed; the
    metrics are written to ``<paths.metrics>/retrieval.json``.
    """
    cfg = params.retrieval
    if params.model.arch != "resnet50" and cfg.imsize < params.model.patch_size:
        raise StageError(f"retrieval.imsize = {cfg.imsize} is smaller than model.patch_size = "
                         f"{params.model.patch_size}")
    if not cfg.datasets:
        raise StageError("retrieval.datasets is empty; allowed: " + ", ".join(DATASETS))
    root = dataset_root(params)
    datasets = [load_revisited(root, name, need_bbx=cfg.crop_queries) for name in cfg.datasets]
    distractor_paths = list_images(cfg.distractors, "retrieval.distractors") if cfg.distractors else []
    device = resolve_device(cfg.device, "retrieval.device")
    backbone = load_rgb_teacher(params)
    distractors = None
    if distractor_paths:
        distractors = image_features(backbone, distractor_paths, cfg.imsize, multiscale=cfg.multiscale,
                                     device=device, num_workers=cfg.num_workers, desc="distractors")
    metrics: dict[str, float] = {}
    for dataset in datasets:
        metrics.update(evaluate_dataset(
            backbone, dataset, imsize=cfg.imsize, multiscale=cfg.multiscale, crop_queries=cfg.crop_queries,
            kappas=cfg.kappas, distractors=distractors, device=device, num_workers=cfg.num_workers,
        ))
    metrics["n_distractors"] = float(len(distractor_paths))
    write_json(Path(params.paths.metrics) / "retrieval.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("retrieval", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
