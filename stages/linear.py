"""Linear evaluation on frozen features (paper Sec. 4.1, Table 2; the reference's eval_linear.py),
stage `linear`.

A linear layer (weights N(0, 0.01²), bias 0) is trained on top of the frozen teacher backbone with
SGD (momentum 0.9, no weight decay), learning rate ``lr · batch_size / 256`` (lr 0.001, global batch
1024) following a cosine schedule to 0 over the epochs (the reference's
``CosineAnnealingLR(T_max=epochs, eta_min=0)``, stepped once per epoch), cross-entropy loss, 100
epochs. Features (`stages.extract.pool_features`): the CLS tokens of the last ``n_last_blocks``
blocks, concatenated (ViT-S: 4), or with ``avgpool_patchtokens`` the last block's CLS interleaved
with its mean patch token (ViT-B: n_last_blocks 1); resnet50: its pooled 2048-d feature.

Two modes (``linear.mode``):

- ``full`` (the paper): every epoch the training images go through RandomResizedCrop
  (``train_crop_size``, scale (0.08, 1), bilinear, as torchvision's default the reference uses) and a
  horizontal flip, then through the frozen backbone. Validation images are resized (shorter side
  ``resize``, bicubic) and center-cropped (``crop_size``); being deterministic, their features are
  extracted once and reused at every evaluation (the reference recomputes the same numbers every
  epoch).
- ``features``: trains on the cached features of the extract stage (``paths.features``), without
  augmentation; fast, for small compute. The features are whatever ``extract.pooling`` made.

Each epoch is a permutation of the training set drawn from ``(seed, epoch)``; under
torch.distributed it is padded to a multiple of the world size and strided over the ranks, as the
reference's DistributedSampler, and the linear layer is wrapped in DistributedDataParallel. The
augmentation of each sample is seeded by ``(seed, epoch, index)`` (`stages.dino.data.ShardImages`).
After every epoch rank 0 writes ``<paths.linear>/checkpoint.pth`` atomically (layer, optimizer,
epoch, best and history); a rerun with the same params resumes from it and gives exactly the weights
and metrics of an uninterrupted run. Metrics (rank 0) in ``<paths.metrics>/linear.json``: top-1/top-5
of the last epoch and the best top-1 over the evaluations (with the top-5 of that epoch), in percent;
top-5 counts the min(5, C) best classes, as `stages.knn` does.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.accuracy import topk_correct
from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.device import resolve_device
from stages.epoch_order import epoch_indices
from stages.fingerprinted_checkpoint import CHECKPOINT_NAME, resume, save_checkpoint  # noqa: F401 (CHECKPOINT_NAME: the stage's file name)
from stages.params import Params

logger = logging.getLogger(__name__)

#: RandomResizedCrop's area range in the reference (torchvision's default).
TRAIN_CROP_SCALE: tuple[float, float] = (0.08, 1.0)
#: linear.* keys that do not change the result: a checkpoint made with other values resumes.
_RUNTIME_KEYS = ("num_workers", "device")


class LinearClassifier(nn.Module):
    """The reference's linear layer on frozen features.

    Args:
        dim: feature dimension D.
        num_labels: number of classes C.
    """

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, D) (or (B, ...) flattened to D) -> logits (B, C)."""
        return self.linear(x.reshape(x.shape[0], -1))


def cosine_lr(base_lr: float, epochs: int) -> np.ndarray:
    """The learning rate of every epoch: ``base_lr · (1 + cos(π e / epochs)) / 2``, e = 0..epochs-1,
    the closed form of ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch.

    Returns:
        float64 array of shape (epochs,).
    """
    epoch = np.arange(epochs, dtype=np.float64)
    return base_lr * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))


@torch.no_grad()
def evaluate(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of a classifier on features (N, D) with labels (N,)."""
    classifier.eval()
    correct1 = correct5 = 0
    device = next(classifier.parameters()).device
    for start in range(0, features.shape[0], batch_size):
        logits = classifier(features[start : start + batch_size].to(device))
        c1, c5 = topk_correct(logits.float().cpu(), labels[start : start + batch_size])
        correct1, correct5 = correct1 + c1, correct5 + c5
    n = max(features.shape[0], 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def linear_pooling(params: Params) -> tuple[str, int]:
    """(pooling, n_last_blocks) of `stages.extract.pool_features` for mode ``full``.

    Raises:
        StageError: more last blocks than the ViT has, or a token pooling asked of resnet50.
    """
    model, lin = params.model, params.linear
    if model.arch == "resnet50":
        if lin.avgpool_patchtokens:
            raise StageError("linear.avgpool_patchtokens = true needs a ViT; model.arch = 'resnet50'")
        return "cls", 1
    depth = model.depth if model.depth is not None else 12
    if lin.n_last_blocks > depth:
        raise StageError(f"linear.n_last_blocks = {lin.n_last_blocks} exceeds the model's {depth} blocks")
    for key in ("train_crop_size", "crop_size"):
        if getattr(lin, key) % model.patch_size:
            raise StageError(f"linear.{key} = {getattr(lin, key)} is not a multiple of model.patch_size = "
                             f"{model.patch_size}")
    if lin.avgpool_patchtokens:
        return "cls_avgpool", 1
    return "last_blocks", lin.n_last_blocks


def train_transform(crop_size: int) -> Callable[[Any], torch.Tensor]:
    """The reference's training view: RandomResizedCrop(crop_size) (scale (0.08, 1), bilinear),
    horizontal flip, ToTensor, ImageNet normalisation. Image bytes or PIL -> (3, crop, crop)."""
    from torchvision import transforms

    from stages.dino.augment import normalize, to_rgb

    pipeline = transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=TRAIN_CROP_SCALE),
        transforms.RandomHorizontalFlip(),
        normalize(),
    ])
    return lambda image: pipeline(to_rgb(image))


# ------------------------------------------------------------------------------------------------
# training data: cached features or augmented images through the frozen backbone
# ------------------------------------------------------------------------------------------------


class FeatureBatches:
    """Mode ``features``: batches of cached training features.

    Args:
        features: (N, D) float32.
        labels: (N,) int64.
        batch_size: per-rank batch size.
        seed, rank, world_size: see `epoch_indices`.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.features.shape[0] / self.world_size) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B, D), labels (B,)) of one epoch on this rank."""
        order = torch.from_numpy(epoch_indices(self.features.shape[0], self.seed, epoch, self.rank, self.world_size))
        for start in range(0, order.shape[0], self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.features[index], self.labels[index]


class _EpochSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index) for `stages.dino.data.ShardImages`, from `epoch_indices`."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int):
        self.indices = epoch_indices(num_samples, seed, epoch, rank, world_size)
        self.batch_size, self.epoch = batch_size, epoch

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield [(self.epoch, int(i)) for i in self.indices[start : start + self.batch_size]]


class ImageBatches:
    """Mode ``full``: augmented training images through the frozen backbone, pooled.

    Args:
        params: validated params (paths.shards, linear.*).
        backbone: the frozen backbone, on `device`.
        pooling, n_last_blocks: as `stages.extract.pool_features`.
        batch_size: per-rank batch size.
        device: where the backbone runs.
        rank, world_size: this process's place in the process group.
    """

    def __init__(self, params: Params, backbone: nn.Module, pooling: str, n_last_blocks: int, batch_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        from stages.dino.data import ShardImages

        self.dataset = ShardImages(params.paths.shards, "train", train_transform(params.linear.train_crop_size),
                                   seed=params.linear.seed)
        self.params, self.backbone, self.pooling, self.n_last_blocks = params, backbone, pooling, n_last_blocks
        self.batch_size, self.device, self.rank, self.world_size = batch_size, device, rank, world_size

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pooled features (B, D), labels (B,)) of one epoch on this rank."""
        from torch.utils.data import DataLoader

        from stages.extract import pool_features

        lin = self.params.linear
        sampler = _EpochSampler(self.num_samples, self.batch_size, lin.seed, epoch, self.rank, self.world_size)
        # Its own generator: the workers' base seed must not come from (or shift) the global RNG.
        generator = torch.Generator().manual_seed(lin.seed * 100_003 + epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=lin.num_workers,
                            pin_memory=self.device.type == "cuda", generator=generator)
        for images, labels in loader:
            with torch.no_grad():
                feats = pool_features(self.backbone, images.to(self.device, non_blocking=True), self.pooling,
                                      self.n_last_blocks)
            yield feats.float(), labels


# ------------------------------------------------------------------------------------------------
# checkpoint
# ------------------------------------------------------------------------------------------------


def _fingerprint(params: Params, source_sha256: str) -> dict[str, Any]:
    lin = params.linear.model_dump(mode="json")
    for key in _RUNTIME_KEYS:
        lin.pop(key)
    fp: dict[str, Any] = {"linear": lin, "source_sha256": source_sha256}
    if params.linear.mode == "full":
        fp["model"] = params.model.model_dump(mode="json")
    return fp


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def _mean_over_ranks(value: float, info: Any) -> float:
    """`value` averaged over the process group (itself without one), so every rank logs, checks
    and stores the same training loss."""
    if not info.initialized:
        return value
    from stages.distributed import all_reduce_mean

    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    return float(all_reduce_mean(torch.tensor([value], dtype=torch.float64, device=device)).item())


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise StageError(f"linear.batch_size = {batch_size} is not divisible by the {world_size} processes")
    return batch_size // world_size


def _pooled(pooling: Any, blocks: Any) -> tuple:
    """(pooling, blocks), the CLS of the last block alone named as "cls" is."""
    if pooling == "cls" or (pooling == "last_blocks" and blocks == 1):
        return "cls", 1
    return pooling, blocks if pooling == "last_blocks" else 1


def _warn_unlike_full_mode(params: Params, meta: dict[str, Any], root: Path) -> None:
    """Mode features trains on whatever extract pooled; say so when mode full (the paper's
    protocol) would pool otherwise."""
    try:
        wanted = _pooled(*linear_pooling(params))
    except StageError:  # mode full's own checks (crop sizes, depth) do not concern mode features
        return
    if _pooled(meta.get("pooling"), meta.get("n_last_blocks")) != wanted:
        logger.warning("mode features trains on the %s features of %s; mode full (the paper's protocol: "
                       "linear.n_last_blocks, avgpool_patchtokens) would pool %s %s: set extract.pooling to match",
                       meta.get("pooling"), root, *wanted)


def _features_data(params: Params, batch_size: int, rank: int, world_size: int):
    """Mode features: (training batches, val features, val labels, num classes, source sha)."""
    from stages.features import read_train_val

    root = Path(params.paths.features)
    data = read_train_val(root, params.paths.teacher_backbone)
    train_x, train_y, train_meta, val_x, val_y = data.train_x, data.train_y, data.train_meta, data.val_x, data.val_y
    num_classes = data.num_classes or int(max(train_y.max(initial=0), val_y.max(initial=0))) + 1
    logger.info("mode features: %d train / %d val features of dim %d (pooling %s)", train_x.shape[0],
                val_x.shape[0], train_x.shape[1], train_meta.get("pooling"))
    _warn_unlike_full_mode(params, train_meta, root)
    batches = FeatureBatches(torch.from_numpy(train_x), torch.from_numpy(train_y), batch_size, params.linear.seed,
                             rank, world_size)
    # the arrays' own hash: a finished checkpoint is reused only for these very features (another
    # extract.resize or precision gives other features from the same checkpoint and pooling)
    digest = hashlib.sha256()
    for array in (train_x, train_y, val_x, val_y):
        digest.update(np.ascontiguousarray(array).data)
    return batches, torch.from_numpy(val_x), torch.from_numpy(val_y), num_classes, digest.hexdigest()


def _full_data(params: Params, batch_size: int, device: torch.device, rank: int, world_size: int):
    """Mode full: (training batches, val features, val labels, num classes, source sha)."""
    from stages.dino.augment import eval_transform
    from stages.dino.checkpoint import load_teacher, teacher_path
    from stages.extract import extract_split
    from stages.file_digest import file_sha256
    from stages.shard_format import MANIFEST_NAME, read_manifest

    pooling, n_last_blocks = linear_pooling(params)
    ckpt = teacher_path(params)
    backbone = load_teacher(params).to(device).eval()
    num_classes = len(read_manifest(params.paths.shards)["classes"])
    lin = params.linear
    # The validation features are deterministic: extracted once (through extract's machinery, with
    # linear's sizes and pooling) and reused at every evaluation; in fp32, as the training
    # features (`ImageBatches`) and the reference's eval_linear.py.
    val_params = params.model_copy(update={"extract": params.extract.model_copy(update={
        "resize": lin.resize, "crop_size": lin.crop_size, "n_last_blocks": n_last_blocks,
        "batch_size": batch_size, "num_workers": lin.num_workers, "device": str(device.type),
        "precision": "fp32",
    })})
    val_x, val_y, _ = extract_split(val_params, "val", backbone, eval_transform(lin.resize, lin.crop_size), pooling)
    batches = ImageBatches(params, backbone, pooling, n_last_blocks, batch_size, device, rank, world_size)
    logger.info("mode full: %d train images, %d val features of dim %d (pooling %s, n_last_blocks %d)",
                batches.num_samples, val_x.shape[0], val_x.shape[1], pooling, n_last_blocks)
    # the checkpoint and the shards (manifest.json names and hashes every shard) determine the data
    source = f"{file_sha256(ckpt)}:{file_sha256(Path(params.paths.shards) / MANIFEST_NAME)}"
    return batches, val_x, val_y, num_classes, source


def run(params: Params) -> dict[str, float]:
    """Stage `linear` (module docstring): train, evaluate, checkpoint every epoch, write metrics.

    Returns:
        The flat metrics: ``top1``, ``top5`` (last epoch), ``top1_best``, ``top5_best`` (the epoch
        with the best top-1), ``best_epoch`` (1-based), ``epochs``, ``loss`` (mean training loss of
        the last epoch), ``lr`` (the scaled base learning rate), ``n_train``, ``n_val``.
    """
    from stages.distributed import barrier, init_distributed

    lin = params.linear
    info = init_distributed()
    device = resolve_device(lin.device, "linear.device", info.device)
    batch = _per_rank_batch(lin.batch_size, info.world_size)
    if lin.mode == "features":
        batches, val_x, val_y, num_classes, source = _features_data(params, batch, info.rank, info.world_size)
        n_train = batches.features.shape[0]
    else:
        batches, val_x, val_y, num_classes, source = _full_data(params, batch, device, info.rank, info.world_size)
        n_train = batches.num_samples
    dim = int(val_x.shape[1])
    with torch.random.fork_rng(devices=[]):  # the layer's init only; the caller's RNG is left alone
        torch.manual_seed(lin.seed)
        classifier = LinearClassifier(dim, num_classes)
    classifier = classifier.to(device)
    base_lr = lin.lr * lin.batch_size / 256.0
    lrs = cosine_lr(base_lr, lin.epochs)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=float(lrs[0]), momentum=lin.momentum,
                                weight_decay=lin.weight_decay)
    fingerprint = _fingerprint(params, source)
    start_epoch, history, best = resume(params.paths.linear, fingerprint, "linear",
                                        {"classifier": classifier, "optimizer": optimizer})
    model: nn.Module = classifier
    if info.initialized:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(classifier, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss()

    for epoch in tqdm(range(start_epoch, lin.epochs), desc="linear", unit="epoch", initial=start_epoch,
                      total=lin.epochs, disable=not info.is_main):
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[epoch])
        model.train()
        # summed on the device: reading each step's loss back would make the host wait for the GPU
        loss_sum, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for feats, labels in batches.epoch(epoch):
            logits = model(feats.to(device))
            loss = criterion(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        mean_loss = _mean_over_ranks(float(loss_sum) / max(steps, 1), info)
        if not math.isfinite(mean_loss):
            raise StageError(f"non-finite linear-classifier loss ({mean_loss}) in epoch {epoch + 1}")
        row: dict[str, float] = {"epoch": epoch + 1, "loss": mean_loss, "lr": float(lrs[epoch])}
        if epoch % lin.val_freq == 0 or epoch == lin.epochs - 1:
            row.update(evaluate(classifier, val_x, val_y))
            if row["top1"] > best["top1"]:
                best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1}
            logger.info("epoch %d: loss %.4f, val top-1 %.2f%%, top-5 %.2f%% (best top-1 %.2f%%)",
                        epoch + 1, mean_loss, row["top1"], row["top5"], best["top1"])
        history.append(row)
        if info.is_main:
            save_checkpoint(params.paths.linear, {
                "classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "history": history, "best": best, "fingerprint": fingerprint,
            })
        barrier()

    last = history[-1]
    metrics = {
        "top1": float(last["top1"]), "top5": float(last["top5"]),
        "top1_best": float(best["top1"]), "top5_best": float(best["top5"]), "best_epoch": float(best["epoch"]),
        "epochs": float(lin.epochs), "loss": float(last["loss"]), "lr": float(base_lr),
        "n_train": float(n_train), "n_val": float(val_x.shape[0]),
    }
    if info.is_main:
        write_json(Path(params.paths.metrics) / "linear.json", metrics)
    logger.info("linear evaluation: top-1 %.2f%% (best %.2f%% at epoch %d)", metrics["top1"], metrics["top1_best"],
                best["epoch"])
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("linear", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
