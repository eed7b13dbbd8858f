"""Stage `transfer`: fine-tune the pretrained backbone with a linear classifier (paper Sec. 4.2.3,
Table 6), following DeiT's fine-tuning recipe as the paper does.

The teacher backbone (``paths.teacher_backbone``, any layout `stages.dino.checkpoint.load_backbone`
reads) is rebuilt with stochastic depth ``transfer.drop_path_rate``, made trainable, and topped with
a linear layer (truncated N(0, 0.02²) weights, zero bias, as DeiT/timm initialise their head) on the
final-norm CLS feature. Both are trained end to end:

- Data: ``transfer.dataset`` None reads the project's shards (``paths.shards``, train -> val);
  otherwise the source it names (CIFAR-10/100 pickles, or an ImageFolder tree for Flowers, Cars,
  iNaturalist) is read in place through `stages.sources.open_source`, with its optional stratified
  ``subset``.
- Training view (DeiT / timm ``create_transform``): RandomResizedCrop(``crop_size``, scale
  ``crop_scale``, bicubic), horizontal flip, torchvision ``RandAugment(num_ops=2, magnitude=9)``
  (DeiT: timm's rand-m9-mstd0.5-inc1, which torchvision does not have), ImageNet normalisation;
  then Mixup (alpha 0.8) or CutMix (alpha 1.0), one of them per batch with probability 0.5 each,
  mixing each image with the batch's reversed order (timm's ``Mixup``, mode "batch"), on
  label-smoothed targets (0.1). Evaluation view: bicubic resize of the shorter side to ``resize``,
  center crop ``crop_size``.
- Optimisation: AdamW, weight decay 0.05 on weights only (biases, norms, ``pos_embed`` and
  ``cls_token`` get none, as timm's ``no_weight_decay``), learning rate ``lr · batch_size / 512``
  with a linear warm-up from ``warmup_lr`` over ``warmup_epochs`` then a cosine to ``min_lr``;
  soft-target cross-entropy. The schedule is set every iteration (the reference's
  ``cosine_scheduler``); DeiT steps timm's scheduler once per epoch. Left out of DeiT's recipe:
  repeated augmentation, random erasing, the 10 cool-down epochs and model EMA (off in DeiT too).

Reproducibility: an epoch's order is a permutation drawn from ``(seed, epoch)`` (padded and strided
over ranks, as DistributedSampler); each sample's augmentation is seeded by ``(seed, epoch, index)``
and each batch's Mixup/CutMix draw by ``(seed, epoch, step)``; torch's global RNG (stochastic
depth) is reseeded from ``(seed, epoch)`` at every epoch. After every epoch rank 0 writes
``<paths.transfer>/checkpoint.pth`` atomically (model, optimizer, epoch, best, history and a
fingerprint of what determines the result); a rerun with the same params resumes from it and ends
with exactly the weights and metrics of an uninterrupted run (on CPU; CUDA kernels may differ in the
last bits). Metrics (``<paths.metrics>/transfer.json``): top-1/top-5 of the last evaluation and the
best top-1 (with its top-5 and epoch), in percent; top-5 counts the min(5, C) best classes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stages.accuracy import topk_correct
from stages.atomic import write_json
from stages.cli import StageError, run_stage
from stages.device import autocast_for, resolve_device
from stages.epoch_order import epoch_indices
from stages.file_digest import file_sha256
from stages.fingerprinted_checkpoint import CHECKPOINT_NAME, resume, save_checkpoint  # noqa: F401 (CHECKPOINT_NAME: the stage's file name)
from stages.params import Params, Transfer

logger = logging.getLogger(__name__)

#: DeiT scales its learning rate linearly with the global batch size, relative to 512.
LR_BATCH_BASE = 512
#: ViT parameters without weight decay besides biases and 1-D tensors (timm's no_weight_decay).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "dist_token")
#: transfer.* keys that do not change the result: a checkpoint made with other values resumes.
_RUNTIME_KEYS = ("num_workers", "device", "val_freq")


class TransferModel(nn.Module):
    """The pretrained backbone with a linear classifier on its feature.

    Args:
        backbone: maps images (B, 3, H, W) to features (B, D); has attribute ``embed_dim`` = D.
        num_classes: C.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (B, C)."""
        return self.head(self.backbone(x))


# ------------------------------------------------------------------------------------------------
# recipe pieces
# ------------------------------------------------------------------------------------------------


def scaled_lr(lr: float, batch_size: int) -> float:
    """DeiT's linear scaling: ``lr · batch_size / 512``."""
    return lr * batch_size / LR_BATCH_BASE


def lr_schedule(cfg: Transfer, steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every iteration: linear warm-up from ``warmup_lr`` to the scaled lr over
    ``warmup_epochs``, then a cosine to ``min_lr``.

    Returns:
        float64 array of shape (epochs · steps_per_epoch,).
    """
    from stages.dino.schedules import cosine_scheduler

    return cosine_scheduler(scaled_lr(cfg.lr, cfg.batch_size), cfg.min_lr, cfg.epochs, steps_per_epoch,
                            warmup_epochs=cfg.warmup_epochs, start_warmup_value=cfg.warmup_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weights with `weight_decay`; biases, 1-D tensors and the ViT's position
    embedding and tokens (`NO_WEIGHT_DECAY`) without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or name.endswith(".bias") or leaf in NO_WEIGHT_DECAY:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed targets: ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C``
    elsewhere (torch's ``CrossEntropyLoss(label_smoothing=...)``). labels (B,) -> (B, C) float32."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    targets.scatter_(1, labels.long().reshape(-1, 1).cpu(), 1.0 - smoothing + off)
    return targets.to(labels.device)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-Σ_c t_c log softmax(z)_c``; logits and targets (B, C)."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019, timm ``rand_bbox``): sides ``int(side · sqrt(1 - lam))``
    around a uniformly drawn centre, clipped to the image.

    Returns:
        (y0, y1, x0, x1), the rows y0:y1 and columns x0:x1.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


def mix_batch(images: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float, switch_prob: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix of a batch with its reversed order (timm ``Mixup``, mode "batch").

    With both alphas on, CutMix is chosen with probability `switch_prob`. Mixup: ``lam·x + (1 -
    lam)·x.flip(0)``, lam ~ Beta(mixup, mixup). CutMix: lam ~ Beta(cutmix, cutmix), a box of
    area ≈ (1 - lam) pasted from the reversed batch, lam then set to the uncovered fraction.
    Targets are mixed the same way: ``lam·t + (1 - lam)·t.flip(0)``.

    Args:
        images: (B, C, H, W) float.
        targets: (B, K) soft targets.
        mixup, cutmix: the Beta alphas (0: off; both 0 returns the inputs unchanged, lam 1).
        switch_prob: probability of CutMix when both are on.
        rng: the source of every random draw.

    Returns:
        (mixed images (B, C, H, W), mixed targets (B, K), lam).
    """
    if mixup <= 0 and cutmix <= 0:
        return images, targets, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    flipped = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam), lam


def train_transform(cfg: Transfer) -> Callable[[Any], torch.Tensor]:
    """DeiT's training view: RandomResizedCrop (bicubic), flip, RandAugment, ImageNet normalisation.
    Image bytes or PIL -> (3, crop_size, crop_size)."""
    from torchvision import transforms

    from stages.dino.augment import normalize, to_rgb

    steps: list[Callable] = [
        transforms.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.crop_scale),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
    ]
    if cfg.randaugment_ops > 0:
        steps.append(transforms.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude))
    pipeline = transforms.Compose([*steps, normalize()])
    return lambda image: pipeline(to_rgb(image))


# ------------------------------------------------------------------------------------------------
# data: the project's shards or a source read in place
# ------------------------------------------------------------------------------------------------


class SourceImages(Dataset):
    """Map-style view of one split of a `stages.sources` source, with `ShardImages`' interface:
    ``dataset[(epoch, index)]`` is ``(transform(image), label)`` with the transform's randomness
    seeded from ``(seed, epoch, index)``.

    Args:
        source: an opened source.
        split: "train" or "val".
        indices: the source indices used (a subset, in source order).
        transform: PIL image -> tensor.
        seed: augmentation seed.
    """

    def __init__(self, source: Any, split: str, indices: np.ndarray, transform: Callable, seed: int = 0) -> None:
        self.source, self.split, self.transform, self.seed = source, split, transform, seed
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = source.labels(split)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from stages.sources import BadImageError

        epoch, index = item
        location = f"{self.source.describe()} {self.split}[{int(self.indices[index])}]"
        try:
            image = self.source.load(self.split, int(self.indices[index]))
        except BadImageError as exc:
            raise StageError(f"{exc.location}: unreadable image ({exc.reason})") from exc
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only: see stages/dino/data.py
            try:
                return self.transform(image), int(self.labels[index])
            except Exception as exc:
                raise StageError(f"{location}: {exc}") from exc


class _Batches(Sampler):
    """Batches of (epoch, index) over the given order."""

    def __init__(self, order: np.ndarray, batch_size: int, epoch: int) -> None:
        self.order, self.batch_size, self.epoch = order, batch_size, epoch

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.order), self.batch_size):
            yield [(self.epoch, int(i)) for i in self.order[start : start + self.batch_size]]


def open_splits(params: Params) -> tuple[Dataset, Dataset, list[str], str]:
    """(train dataset, val dataset, class names, a fingerprint of the data) of the transfer set.

    Raises:
        StageError: missing shards or source files, or an empty split.
    """
    cfg = params.transfer
    train_tf, val_tf = train_transform(cfg), _eval_transform(cfg)
    if cfg.dataset is None:
        from stages.dino.data import ShardImages
        from stages.shard_format import MANIFEST_NAME, read_manifest

        shards = Path(params.paths.shards)
        classes = list(read_manifest(shards)["classes"])
        train = ShardImages(shards, "train", train_tf, seed=cfg.seed)
        val = ShardImages(shards, "val", val_tf, seed=cfg.seed)
        return train, val, classes, f"shards:{file_sha256(shards / MANIFEST_NAME)}"
    from stages.sources import open_source, stratified_subset

    source = open_source(cfg.dataset)
    classes = source.classes()
    splits = []
    for split, transform in (("train", train_tf), ("val", val_tf)):
        labels = source.labels(split)
        chosen = stratified_subset(labels, cfg.dataset.subset.get(split), cfg.dataset.seed)
        if len(chosen) == 0:
            raise StageError(f"transfer.dataset: split {split!r} of {source.describe()} is empty")
        splits.append(SourceImages(source, split, chosen, transform, seed=cfg.seed))
    fingerprint = json.dumps({"source": source.describe(), "subset": dict(cfg.dataset.subset),
                              "seed": cfg.dataset.seed}, sort_keys=True)
    return splits[0], splits[1], classes, fingerprint


def _eval_transform(cfg: Transfer) -> Callable[[Any], torch.Tensor]:
    from stages.dino.augment import eval_transform

    return eval_transform(cfg.resize, cfg.crop_size)


def _labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, SourceImages):
        return dataset.labels
    return np.array([entry.label for entry in dataset.entries], dtype=np.int64)  # ShardImages


# ------------------------------------------------------------------------------------------------
# checkpoint
# ------------------------------------------------------------------------------------------------


def _fingerprint(params: Params, backbone_sha256: str, data: str) -> dict[str, Any]:
    cfg = params.transfer.model_dump(mode="json")
    for key in _RUNTIME_KEYS:
        cfg.pop(key)
    return {"transfer": cfg, "model": params.model.model_dump(mode="json"), "backbone_sha256": backbone_sha256,
            "data": data}


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def build_model(params: Params, num_classes: int) -> TransferModel:
    """The teacher backbone of ``paths.teacher_backbone`` (trainable, with stochastic depth
    ``transfer.drop_path_rate``) and a new linear head, seeded by ``transfer.seed``.

    Raises:
        StageError: the checkpoint is missing or does not match ``model.*``, or the crop size is
            not a whole number of patches.
    """
    from stages.dino.checkpoint import load_teacher, teacher_path

    model, cfg = params.model, params.transfer
    teacher_path(params)
    if model.arch != "resnet50" and cfg.crop_size % model.patch_size:
        raise StageError(f"transfer.crop_size = {cfg.crop_size} is not a multiple of model.patch_size = "
                         f"{model.patch_size}")
    backbone = load_teacher(params, drop_path_rate=cfg.drop_path_rate)
    backbone.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):  # the head's init only; the caller's RNG is left alone
        torch.manual_seed(cfg.seed)
        net = TransferModel(backbone, num_classes)
    return net.train()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, precision: str,
             num_workers: int = 0, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) on a dataset with `ShardImages`' (epoch, index) interface;
    each rank takes a stride of the samples and the counts are summed over ranks."""
    from stages.distributed import all_gather_cat

    was_training = model.training
    model.eval()
    order = np.arange(rank, len(dataset), world_size, dtype=np.int64)
    loader = DataLoader(dataset, batch_sampler=_Batches(order, batch_size, 0), num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(3, dtype=torch.float64)
    for images, labels in loader:
        with autocast_for(precision, device):
            logits = model(images.to(device, non_blocking=True))
        c1, c5 = topk_correct(logits.float().cpu(), labels)
        counts += torch.tensor([c1, c5, labels.shape[0]], dtype=torch.float64)
    total = all_gather_cat(counts.to(device)[None]).sum(dim=0).cpu()
    model.train(was_training)
    n = max(float(total[2]), 1.0)
    return {"top1": 100.0 * float(total[0]) / n, "top5": 100.0 * float(total[1]) / n}


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


def run(params: Params) -> dict[str, float]:
    """Stage `transfer` (module docstring): fine-tune, evaluate, checkpoint every epoch, write metrics.

    Returns:
        The flat metrics: ``top1``, ``top5`` (last evaluation), ``top1_best``, ``top5_best``,
        ``best_epoch`` (1-based), ``epochs``, ``loss`` (mean training loss of the last epoch), ``lr``
        (the scaled peak learning rate), ``n_train``, ``n_val``, ``num_classes``.

    Raises:
        StageError: missing inputs, a batch size not divisible by the ranks, a non-finite loss.
    """
    from stages.distributed import barrier, init_distributed

    cfg = params.transfer
    info = init_distributed()
    device = resolve_device(cfg.device, "transfer.device", info.device)
    if cfg.batch_size % info.world_size:
        raise StageError(f"transfer.batch_size = {cfg.batch_size} is not divisible by the {info.world_size} processes")
    batch = cfg.batch_size // info.world_size
    train_set, val_set, classes, data_fp = open_splits(params)
    num_classes = len(classes)
    labels = np.concatenate([_labels_of(train_set), _labels_of(val_set)])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise StageError(f"transfer data: labels outside [0, {num_classes}) ({data_fp})")
    net = build_model(params, num_classes).to(device)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / info.world_size) / batch)
    lrs = lr_schedule(cfg, steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=float(lrs[0]))
    fingerprint = _fingerprint(params, file_sha256(params.paths.teacher_backbone), data_fp)
    start_epoch, history, best = resume(params.paths.transfer, fingerprint, "transfer",
                                        {"model": net, "optimizer": optimizer})
    model: nn.Module = net
    if info.initialized:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    logger.info("transfer: %d train / %d val images, %d classes, %d steps per epoch, peak lr %.3g",
                len(train_set), len(val_set), num_classes, steps_per_epoch, scaled_lr(cfg.lr, cfg.batch_size))

    bar = tqdm(range(start_epoch, cfg.epochs), desc="transfer", unit="epoch", initial=start_epoch,
               total=cfg.epochs, disable=not info.is_main)
    for epoch in bar:
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # stochastic depth
        order = epoch_indices(len(train_set), cfg.seed, epoch, info.rank, info.world_size)
        # Its own generator: the workers' base seed must not come from (or shift) the global RNG.
        loader = DataLoader(train_set, batch_sampler=_Batches(order, batch, epoch), num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(epoch))
        model.train()
        # summed on the device: reading each step's loss back would make the host wait for the GPU
        loss_sum, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for step, (images, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                                                      disable=not info.is_main)):
            it = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[it])
            rng = np.random.default_rng([cfg.seed, epoch, step, info.rank])
            soft = smooth_one_hot(targets, num_classes, cfg.label_smoothing)
            images, soft, _ = mix_batch(images, soft, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, rng)
            with autocast_for(cfg.precision, device):
                logits = model(images.to(device, non_blocking=True))
            loss = soft_cross_entropy(logits, soft.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        mean_loss = float(loss_sum) / max(steps, 1)
        if not math.isfinite(mean_loss):
            raise StageError(f"non-finite transfer loss ({mean_loss}) in epoch {epoch + 1}")
        row: dict[str, float] = {"epoch": epoch + 1, "loss": mean_loss, "lr": float(lrs[it])}
        if epoch % cfg.val_freq == 0 or epoch == cfg.epochs - 1:
            row.update(evaluate(net, val_set, batch, device, cfg.precision, cfg.num_workers, info.rank,
                                info.world_size))
            if row["top1"] > best["top1"]:
                best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1}
            logger.info("epoch %d: loss %.4f, val top-1 %.2f%%, top-5 %.2f%% (best top-1 %.2f%%)",
                        epoch + 1, mean_loss, row["top1"], row["top5"], best["top1"])
            bar.set_postfix(loss=f"{mean_loss:.3f}", top1=f"{row['top1']:.1f}")
        history.append(row)
        if info.is_main:
            save_checkpoint(params.paths.transfer, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "history": history, "best": best, "fingerprint": fingerprint,
            })
        barrier()

    evaluated = [row for row in history if "top1" in row]
    last = evaluated[-1]
    metrics = {
        "top1": float(last["top1"]), "top5": float(last["top5"]),
        "top1_best": float(best["top1"]), "top5_best": float(best["top5"]), "best_epoch": float(best["epoch"]),
        "epochs": float(cfg.epochs), "loss": float(history[-1]["loss"]),
        "lr": float(scaled_lr(cfg.lr, cfg.batch_size)),
        "n_train": float(len(train_set)), "n_val": float(len(val_set)), "num_classes": float(num_classes),
    }
    if info.is_main:
        write_json(Path(params.paths.metrics) / "transfer.json", metrics)
    logger.info("transfer: top-1 %.2f%% (best %.2f%% at epoch %d)", metrics["top1"], metrics["top1_best"],
                int(best["epoch"]))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("transfer", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
