"""Frozen features of the teacher backbone (stage `extract`), as the reference's eval_knn.py /
eval_linear.py compute them.

Poolings (``extract.pooling``; D is the backbone's embed_dim):

- ``cls`` (default): the final-norm CLS token, (B, D) -- eval_knn.py. For resnet50, the
  globally average-pooled 2048-d feature.
- ``last_blocks``: the CLS tokens of the last ``n_last_blocks`` blocks (each through the final
  norm), concatenated from the earliest to the last block, (B, n·D) -- eval_linear.py (ViT-S uses
  n_last_blocks = 4).
- ``cls_avgpool``: the last block's CLS and the mean of its patch tokens, (B, 2D) --
  eval_linear.py's ``avgpool_patchtokens`` (ViT-B, n_last_blocks = 1). The layout is the
  reference's ``cat((cls[..., None], avg[..., None]), -1).reshape(B, -1)``, i.e. interleaved
  ``[cls_0, avg_0, cls_1, avg_1, ...]``, so that the reference's linear-classifier weights apply.
- ``gem``: generalised-mean pooling with p = 4 over the last block's (final-norm) patch tokens,
  ``mean(clamp(x, 1e-6)^p)^(1/p)`` per channel, (B, D) -- as the reference's retrieval features.
- ``multiscale``: the CLS feature averaged over the input at scales 1, 1/sqrt(2), 1/2 (bilinear
  resize, ``align_corners=False``) and L2-normalised per row, (B, D) -- the reference's
  ``utils.multi_scale`` (which normalises the whole batch by one norm: it ran with batch size 1).
  For ViTs the resized input is cut to a multiple of the patch size at the bottom/right, which is
  what the reference's stride-p patch convolution does implicitly (224 -> 158 -> 9 patches of 16).

Extraction is batched under ``torch.no_grad``, bf16 autocast on CUDA and fp32 on CPU, with a
progress bar. Under torch.distributed each rank takes every world_size-th sample (sample i goes to
rank i mod world_size) and the results are gathered with `all_gather_cat` and put back into the
shards' order by their sample indices.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from stages.atomic import atomic_dir
from stages.cli import StageError, run_stage
from stages.device import autocast_for, forward_precision, resolve_device
from stages.features import write_features
from stages.file_digest import file_sha256
from stages.params import Params

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "last_blocks", "cls_avgpool", "gem", "multiscale"]
POOLINGS: tuple[str, ...] = ("cls", "last_blocks", "cls_avgpool", "gem", "multiscale")
GEM_P = 4.0
GEM_EPS = 1e-6
MULTISCALE_SCALES: tuple[float, ...] = (1.0, 1.0 / math.sqrt(2.0), 0.5)
SPLITS: tuple[str, ...] = ("train", "val")
#: Features stay on the device for this many batches and come back to the host together: a copy to
#: the host waits for the GPU, so one per batch would stop the host from queuing the next batch
#: while the GPU computes this one.
BATCHES_PER_COPY = 16


def _is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "get_intermediate_layers")


def _last_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's final-norm tokens, (B, 1 + N, D) with the CLS token first."""
    return backbone.get_intermediate_layers(images, 1)[-1]


def gem_pool(tokens: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised mean over tokens: (B, N, D) -> (B, D), ``mean_n(clamp(x, eps)^p)^(1/p)``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def pool_features(
    backbone: nn.Module, images: torch.Tensor, pooling: Pooling = "cls", n_last_blocks: int = 4
) -> torch.Tensor:
    """One batch of pooled features (module docstring).

    Args:
        backbone: a ViT (with ``get_intermediate_layers``) or a CNN returning (B, D) when called.
        images: (B, C, H, W) normalised images on the backbone's device.
        pooling: one of `POOLINGS`.
        n_last_blocks: blocks whose CLS tokens ``last_blocks`` concatenates.

    Returns:
        (B, D') features: D for cls/gem/multiscale, n_last_blocks·D for last_blocks, 2D for
        cls_avgpool.

    Raises:
        ValueError: an unknown pooling, or a token pooling asked of a backbone without tokens.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
    if pooling == "cls":
        return backbone(images)
    if pooling == "multiscale":
        total = None
        for scale in MULTISCALE_SCALES:
            inp = images if scale == 1.0 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False
            )
            if _is_vit(backbone):
                # The reference's stride-p patch convolution drops the bottom/right remainder.
                patch = backbone.patch_size
                inp = inp[..., : inp.shape[-2] // patch * patch, : inp.shape[-1] // patch * patch]
            feats = backbone(inp).float()
            total = feats if total is None else total + feats
        return F.normalize(total / len(MULTISCALE_SCALES), dim=1, p=2)
    if not _is_vit(backbone):
        raise ValueError(
            f"pooling {pooling!r} needs a ViT backbone with get_intermediate_layers; "
            f"{type(backbone).__name__} supports 'cls' and 'multiscale'"
        )
    if pooling == "last_blocks":
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
        blocks = backbone.get_intermediate_layers(images, n_last_blocks)
        return torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)
    tokens = _last_tokens(backbone, images)
    if pooling == "cls_avgpool":
        cls, avg = tokens[:, 0], tokens[:, 1:].mean(dim=1)
        return torch.stack((cls, avg), dim=-1).reshape(tokens.shape[0], -1)
    return gem_pool(tokens[:, 1:].float())  # gem


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any, Any, Any]:
    """(images, labels | None, indices | None, keys | None) from a tensor or a tuple batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 4 and isinstance(batch[0], torch.Tensor):
        parts = list(batch) + [None] * (4 - len(batch))
        return parts[0], parts[1], parts[2], parts[3]
    raise TypeError(
        "a batch must be an image tensor (B, C, H, W) or a tuple (images[, labels[, indices[, keys]]]), "
        f"got {type(batch).__name__}"
    )


def _gather_keys(keys: list[str]) -> list[str]:
    import torch.distributed as dist

    from stages.distributed import get_world_size

    if get_world_size() == 1:
        return keys
    gathered: list[list[str] | None] = [None] * get_world_size()
    dist.all_gather_object(gathered, keys)
    return [k for part in gathered for k in part]  # type: ignore[union-attr]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[Any],
    pooling: Pooling = "cls",
    n_last_blocks: int = 4,
    device: str | torch.device = "cpu",
    *,
    precision: str = "auto",
    progress: bool = True,
    total: int | None = None,
    desc: str = "extract",
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Pooled features of every image the batches hold, gathered over ranks, in original order.

    Args:
        backbone: the frozen model (put in eval mode and moved to `device` here).
        batches: an iterable or DataLoader of image tensors (B, C, H, W), or of tuples
            ``(images, labels[, indices[, keys]])`` with labels (B,), indices (B,) the samples'
            global positions, keys B strings.
        pooling: one of `POOLINGS`.
        n_last_blocks: for ``last_blocks``.
        device: where to run.
        precision: "auto" (`stages.device.forward_precision`), "bf16" or "fp32".
        progress: show a tqdm bar (on rank 0 only).
        total: number of batches, for the bar.
        desc: the bar's label.

    Returns:
        ``(features, labels, keys)``: float32 (N, D') on the CPU; int64 (N,) or None when batches
        carry no labels; N keys or None. With a process group every rank's rows are gathered
        (`all_gather_cat`); with indices the rows are ordered by index (then the indices gathered
        from all ranks must be exactly 0..N-1), else in rank order.

    Raises:
        ValueError: indices repeat or leave gaps.
    """
    from stages.distributed import all_gather_cat, is_main_process

    device = torch.device(device)
    backbone = backbone.eval().to(device)
    feats, labels, indices, keys = [], [], [], []
    on_device: list[torch.Tensor] = []  # the last batches' features, not yet copied back
    has_labels = has_indices = has_keys = None
    bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not (progress and is_main_process()))
    for batch in bar:
        images, batch_labels, batch_indices, batch_keys = _split_batch(batch)
        if has_labels is None:
            has_labels, has_indices, has_keys = (batch_labels is not None, batch_indices is not None,
                                                 batch_keys is not None)
        images = images.to(device, non_blocking=True)
        with autocast_for(precision, device):
            out = pool_features(backbone, images, pooling, n_last_blocks)
        on_device.append(out.float())
        if len(on_device) == BATCHES_PER_COPY:
            feats.append(torch.cat(on_device).cpu())
            on_device.clear()
        if has_labels:
            labels.append(torch.as_tensor(batch_labels, dtype=torch.int64).reshape(-1))
        if has_indices:
            indices.append(torch.as_tensor(batch_indices, dtype=torch.int64).reshape(-1))
        if has_keys:
            keys.extend(str(k) for k in batch_keys)
    if on_device:
        feats.append(torch.cat(on_device).cpu())
    if feats:
        local = torch.cat(feats)
    else:  # a rank with no samples still takes part in the gather, with the right width
        width = _probe_width(backbone, pooling, n_last_blocks, device)
        local = torch.zeros((0, width))
    # Every rank must make the same collective calls: agree on what the batches carried.
    flags = torch.tensor([[-1 if f is None else int(f) for f in (has_labels, has_indices, has_keys)]])
    has_labels, has_indices, has_keys = (bool(v > 0) for v in _gather(all_gather_cat, flags, device).max(dim=0).values)
    empty = torch.zeros(0, dtype=torch.int64)
    features = _gather(all_gather_cat, local, device)
    out_labels = _gather(all_gather_cat, torch.cat(labels) if labels else empty, device) if has_labels else None
    out_keys = _gather_keys(keys) if has_keys else None
    if has_indices:
        order_src = _gather(all_gather_cat, torch.cat(indices) if indices else empty, device)
        n = features.shape[0]
        if order_src.shape[0] != n or not torch.equal(torch.sort(order_src).values, torch.arange(n)):
            raise ValueError(f"sample indices are not a permutation of 0..{n - 1}")
        order = torch.argsort(order_src)
        features = features[order]
        out_labels = out_labels[order] if out_labels is not None else None
        out_keys = [out_keys[i] for i in order.tolist()] if out_keys is not None else None
    return features, out_labels, out_keys


def _gather(gather: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """all_gather_cat on the process group's device (nccl needs CUDA tensors, gloo takes CPU
    ones, whatever device the model ran on); result on the CPU. `device` is unused without a
    process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    else:
        device = torch.device("cpu")
    return gather(tensor.to(device)).cpu()


def _probe_width(backbone: nn.Module, pooling: Pooling, n_last_blocks: int, device: torch.device) -> int:
    """Feature width when this rank saw no data; needs the backbone's expected input size."""
    embed_dim = getattr(backbone, "embed_dim", None) or getattr(backbone, "num_features", None)
    if embed_dim is None:
        raise ValueError("no batches and a backbone without embed_dim: cannot tell the feature width")
    return {"last_blocks": n_last_blocks * embed_dim, "cls_avgpool": 2 * embed_dim}.get(pooling, embed_dim)


class ShardImages(IterableDataset):
    """Decoded, transformed samples of one split of a shard folder, as (image, label, index, key).

    Sample i (the shards' stored order) belongs to rank ``i mod world_size``, as the reference's
    DistributedSampler(shuffle=False) strides. Inside a rank, DataLoader workers split the shards
    (worker w reads shards w, w + n_workers, ...; the manifest's counts give each shard's first
    index) so that every tar is read once per rank; with fewer shards than workers they stride over
    the rank's samples instead. The index lets `extract_features` restore the order whatever the
    interleaving.

    Args:
        shard_dir: the shard folder (manifest.json and tars).
        split: "train" or "val".
        transform: PIL image -> tensor (C, H, W).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, shard_dir: str | Path, split: str, transform: Callable[[Any], torch.Tensor],
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.shard_dir, self.split, self.transform = Path(shard_dir), split, transform
        self.rank, self.world_size = rank, world_size

    def _indexed_samples(self, worker: int, workers: int) -> Iterator[tuple[int, Any]]:
        """(global index, sample) of this rank and worker, in stored order."""
        from stages.shard_format import iter_samples, read_manifest

        entries = read_manifest(self.shard_dir)["splits"][self.split]["shards"]
        if len(entries) >= workers:
            offsets = [0]
            for entry in entries[:-1]:
                offsets.append(offsets[-1] + int(entry["count"]))
            for shard in range(worker, len(entries), workers):
                samples = iter_samples(self.shard_dir, self.split, shards=[shard])
                for position, sample in enumerate(samples):
                    index = offsets[shard] + position
                    if index % self.world_size == self.rank:
                        yield index, sample
        else:
            for index, sample in enumerate(iter_samples(self.shard_dir, self.split)):
                if index % self.world_size == self.rank and (index // self.world_size) % workers == worker:
                    yield index, sample

    def _shard_path(self, index: int) -> Path:
        """The tar holding the split's sample number `index` (for error messages)."""
        from stages.shard_format import read_manifest

        for entry in read_manifest(self.shard_dir)["splits"][self.split]["shards"]:
            if index < entry["count"]:
                return self.shard_dir / entry["name"]
            index -= entry["count"]
        return self.shard_dir

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int, str]]:
        from stages.shard_format import ShardError, decode_image

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, sample in self._indexed_samples(worker, workers):
            try:
                image = decode_image(sample)
            except ShardError as exc:
                raise ShardError(f"{self._shard_path(index)}: {exc}") from None
            yield self.transform(image), int(sample.label), index, sample.key


def split_size(shard_dir: str | Path, split: str) -> int:
    """Number of samples of `split` according to the manifest."""
    from stages.shard_format import ShardError, read_manifest

    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{Path(shard_dir) / 'manifest.json'}: no split {split!r}; the manifest has "
                         f"{sorted(manifest['splits'])}")
    return int(manifest["splits"][split]["total"])


def split_loader(params: Params, split: str, transform: Callable[[Any], torch.Tensor],
                 rank: int = 0, world_size: int = 1) -> tuple[DataLoader, int]:
    """A DataLoader over one split's shards and its number of batches on this rank."""
    dataset = ShardImages(params.paths.shards, split, transform, rank, world_size)
    n = split_size(params.paths.shards, split)
    n_local = len(range(rank, n, world_size))
    loader = DataLoader(
        dataset,
        batch_size=params.extract.batch_size,
        num_workers=params.extract.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return loader, math.ceil(n_local / params.extract.batch_size)


def pixel_transform(resize: int, crop_size: int) -> Callable[[Any], torch.Tensor]:
    """Raw pixels prepared as for extraction, without the ImageNet normalisation: bicubic resize
    of the shorter side, center crop, values in [0, 1], flattened to (3·crop_size²,)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Lambda(lambda x: x.reshape(-1)),
    ])


def extract_split(
    params: Params,
    split: str,
    backbone: nn.Module,
    transform: Callable[[Any], torch.Tensor] | None = None,
    pooling: Pooling | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features of one split of ``params.paths.shards`` (distributed when a process group exists).

    Args:
        params: validated params (paths.shards, extract.*).
        split: "train" or "val".
        backbone: the frozen backbone (or any module mapping (B, C, H, W) to (B, D)).
        transform: PIL -> tensor; default ``eval_transform(extract.resize, extract.crop_size)``.
        pooling: default ``extract.pooling``.

    Returns:
        ``(features (N, D') float32, labels (N,) int64, keys)``, in the shards' order.
    """
    from stages.distributed import init_distributed

    info = init_distributed()
    device = resolve_device(params.extract.device, "extract.device", info.device)
    if transform is None:
        from stages.dino.augment import eval_transform

        transform = eval_transform(params.extract.resize, params.extract.crop_size)
    loader, n_batches = split_loader(params, split, transform, info.rank, info.world_size)
    feats, labels, keys = extract_features(
        backbone, loader, pooling or params.extract.pooling, params.extract.n_last_blocks, device,
        precision=params.extract.precision, total=n_batches, desc=f"extract {split}",
    )
    if labels is None or keys is None:
        raise StageError(f"{params.paths.shards}: split {split!r} holds no samples")
    return feats, labels, keys


def check_extract_params(params: Params) -> None:
    """Refuse, before any work, combinations the schema cannot see: a token pooling on resnet50,
    a ViT crop that is not a whole number of patches, more last blocks than the ViT has.

    Raises:
        StageError: naming the keys and the allowed values.
    """
    model, extract = params.model, params.extract
    if model.arch == "resnet50":
        if extract.pooling not in ("cls", "multiscale"):
            raise StageError(f"extract.pooling = {extract.pooling!r} needs a ViT; model.arch = 'resnet50' "
                             "allows 'cls' and 'multiscale'")
        return
    if extract.crop_size % model.patch_size:
        raise StageError(f"extract.crop_size = {extract.crop_size} is not a multiple of model.patch_size = "
                         f"{model.patch_size}")
    depth = model.depth if model.depth is not None else 12
    if extract.pooling == "last_blocks" and extract.n_last_blocks > depth:
        raise StageError(f"extract.n_last_blocks = {extract.n_last_blocks} exceeds the model's {depth} blocks")


def run(params: Params) -> dict[str, float]:
    """Stage `extract`: teacher features of the train and val shards into ``paths.features``.

    Loads ``paths.teacher_backbone`` (ours or the reference's files) as ``params.model`` says,
    extracts every split with ``eval_transform(extract.resize, extract.crop_size)`` and the
    configured pooling, and writes ``<paths.features>/{train,val}`` (the whole folder atomically,
    rank 0). Returns a small summary (sample counts and feature dimension).
    """
    from stages.dino.checkpoint import load_teacher, teacher_path
    from stages.distributed import barrier, init_distributed
    from stages.shard_format import read_manifest

    check_extract_params(params)
    info = init_distributed()
    ckpt = teacher_path(params)
    backbone = load_teacher(params)
    manifest = read_manifest(params.paths.shards)
    classes = list(manifest.get("classes", []))
    meta = {
        "arch": params.model.arch,
        "patch_size": params.model.patch_size,
        "embed_dim": int(getattr(backbone, "embed_dim", 0) or 0),
        "checkpoint": str(ckpt),
        "checkpoint_sha256": file_sha256(ckpt),
        "pooling": params.extract.pooling,
        "n_last_blocks": params.extract.n_last_blocks,
        "resize": params.extract.resize,
        "crop_size": params.extract.crop_size,
        "precision": forward_precision(params.extract.precision,
                                       resolve_device(params.extract.device, "extract.device", info.device)),
        "num_classes": len(classes),
        "classes": classes,
    }
    extracted = {split: extract_split(params, split, backbone) for split in SPLITS}
    summary: dict[str, float] = {}
    if info.is_main:
        with atomic_dir(params.paths.features) as tmp:
            for split, (feats, labels, keys) in extracted.items():
                write_features(tmp / split, feats, labels, keys, {**meta, "split": split})
                summary[f"n_{split}"] = float(feats.shape[0])
                summary["dim"] = float(feats.shape[1])
        logger.info("features of %s written to %s", ckpt, params.paths.features)
    barrier()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("extract", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
