"""Pretraining data: random access into WebDataset shards, and epoch-seeded batches.

Samples are read by offset from the (sha256-checked) tar files, so a dataset of any size is
indexed in memory as (shard, offset, size, label) and every epoch is a permutation of it. The
order of an epoch and the random augmentation of every sample are pure functions of
(seed, epoch, index): a resumed run sees exactly the batches an uninterrupted run would, however
many workers load them. Each rank takes a strided slice of the permutation, and every rank has the
same number of batches per epoch so that all ranks step together.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from stages.shard_format import ShardError, read_manifest, shard_paths

IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class Entry:
    shard: int
    offset: int
    size: int
    label: int
    key: str


def index_shards(shard_dir: str | Path, split: str, verify: bool = True) -> tuple[list[Path], list[Entry]]:
    """Index every sample of a split; labels come from the .cls members. Each shard must hold
    whole samples, as many as the manifest says."""
    paths = shard_paths(shard_dir, split, verify=verify)
    manifest = read_manifest(shard_dir)
    num_classes = len(manifest["classes"])
    counts = {entry["name"]: entry["count"] for entry in manifest["splits"][split]["shards"]}
    entries: list[Entry] = []
    for shard_number, path in enumerate(paths):
        images: dict[str, tarfile.TarInfo] = {}
        labels: dict[str, int] = {}
        size, key = path.stat().st_size, None
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if member.offset_data + member.size > size:
                        raise ShardError(f"{path}: sample {key!r} is truncated")
                    if ext in IMAGE_EXTS:
                        images[key] = member
                    elif ext == "cls":
                        text = tar.extractfile(member).read().decode().strip()
                        if not text.lstrip("-").isdigit() or not 0 <= int(text) < num_classes:
                            raise ShardError(f"{path}: sample {key!r}: class {text!r} is not in 0..{num_classes - 1}")
                        labels[key] = int(text)
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = f" after sample {key!r}" if key else ""
            raise ShardError(f"{path}: unreadable shard{where} ({exc})") from exc
        for key, member in images.items():
            if key not in labels:
                raise ShardError(f"{path}: sample {key!r} has no .cls label")
            entries.append(Entry(shard_number, member.offset_data, member.size, labels[key], key))
        expected = counts.get(path.name)
        if expected is not None and len(images) != expected:
            raise ShardError(f"{path}: holds {len(images)} samples, the manifest says {expected}")
    if not entries:
        raise ShardError(f"{shard_dir}: split {split!r} has no samples")
    return paths, entries


class ShardImages(Dataset):
    """Map-style view of a split. `dataset[(epoch, index)]` returns (transform(bytes), label)
    with the transform's randomness seeded from (seed, epoch, index); a transform that draws
    nothing (`random_transform=False`, e.g. decoding only) is not seeded: that costs more than
    decoding a small image."""

    def __init__(self, shard_dir: str | Path, split: str, transform: Callable, seed: int = 0,
                 verify: bool = True, random_transform: bool = True):
        self.paths, self.entries = index_shards(shard_dir, split, verify=verify)
        self.transform = transform
        self.seed = seed
        self.random_transform = random_transform
        self._files: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.entries)

    def read_bytes(self, index: int) -> bytes:
        if self._pid != os.getpid():  # a fresh worker must not share file offsets
            self._files, self._pid = {}, os.getpid()
        entry = self.entries[index]
        handle = self._files.get(entry.shard)
        if handle is None:
            handle = self._files[entry.shard] = open(self.paths[entry.shard], "rb")
        handle.seek(entry.offset)
        data = handle.read(entry.size)
        if len(data) != entry.size:
            raise ShardError(f"{self.paths[entry.shard]}: sample {entry.key!r} is truncated")
        return data

    def sample_seed(self, epoch: int, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        data = self.read_bytes(index)
        try:
            if not self.random_transform:
                return self.transform(data), self.entries[index].label
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also queues a CUDA seed with a formatted
                # stack trace on CUDA builds (~3 ms per sample, more than decoding a small image).
                torch.random.default_generator.manual_seed(self.sample_seed(epoch, index))
                return self.transform(data), self.entries[index].label
        except ShardError:
            raise
        except Exception as exc:  # name the sample, whatever the decoder raised
            entry = self.entries[index]
            raise ShardError(f"{self.paths[entry.shard]}: sample {entry.key!r}: {exc}") from exc


class EpochBatches(Sampler):
    """This rank's batches of one epoch: a seeded permutation, cut into global batches of
    batch_size·world_size (the incomplete tail dropped), each rank taking its stride.

    Yields lists of (epoch, index); `start_step` skips the batches a resumed run already did.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start_step = start_step
        self.steps = num_samples // (batch_size * world_size)

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def index_batches(self) -> np.ndarray:
        """(len(self), batch_size) sample indices: this rank's batches, in order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        global_batch = self.batch_size * self.world_size
        steps = order[self.start_step * global_batch:self.steps * global_batch].reshape(-1, global_batch)
        return steps[:, self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.index_batches():
            yield [(self.epoch, int(i)) for i in batch]


def collate_views(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(views, label)] -> ([stacked view 0, stacked view 1, ...], labels)."""
    views = [torch.stack(group) for group in zip(*(item[0] for item in batch))]
    labels = torch.tensor([item[1] for item in batch], dtype=torch.long)
    return views, labels


def decode_uint8(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 tensor (C, H, W), C = 1 for grayscale or 3 (for batched augmentation)."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch must not alias PIL's buffer
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(uint8 (C, H, W), label)] -> (uint8 (B, C, H, W), labels); all images the same size."""
    shapes = {tuple(image.shape) for image, _ in batch}
    if len(shapes) > 1:
        raise ValueError(f"pretrain.augment = 'batch' needs images of one size; this batch has {sorted(shapes)}")
    return torch.stack([image for image, _ in batch]), torch.tensor([label for _, label in batch], dtype=torch.long)


class DecodedImages:
    """A split decoded once into one uint8 tensor (N, C, H, W) on the training device, for
    datasets small enough (Fashion-MNIST: 47 MB): every later batch is an index into it instead
    of reading and decoding files in loader workers. The same images in the same batches as the
    loader gives (`augment: batch` decodes only)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    @classmethod
    def decode(cls, dataset: ShardImages, device: torch.device, max_bytes: int, num_workers: int = 0,
               batch_size: int = 256) -> "DecodedImages | None":
        """Every image of `dataset` (whose transform decodes to uint8 (C, H, W)), or None when
        they would take more than `max_bytes`.

        Raises:
            ShardError: an undecodable sample, named; or images of different sizes.
        """
        first, _ = dataset[(0, 0)]
        if len(dataset) * first.numel() > max_bytes:
            return None
        images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
        starts = range(0, len(dataset), batch_size)
        batches = [[(0, i) for i in range(start, min(start + batch_size, len(dataset)))] for start in starts]
        # A generator of its own: the workers' base seed must not come from the global RNG.
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_images,
                            generator=torch.Generator().manual_seed(0))
        for start, (batch, _) in zip(starts, loader):
            if batch.shape[1:] != first.shape:
                raise ShardError(f"pretrain.augment = 'batch' needs images of one size: sample "
                                 f"{dataset.entries[0].key!r} is {tuple(first.shape)}, sample "
                                 f"{dataset.entries[start].key!r} {tuple(batch.shape[1:])}")
            images[start:start + len(batch)] = batch
        return cls(images.to(device))

    def batches(self, sampler: EpochBatches) -> Iterator[torch.Tensor]:
        """The sampler's batches of images, on the device."""
        # One copy of the epoch's order per epoch, not one per step.
        for index in torch.from_numpy(sampler.index_batches()).to(self.images.device):
            yield self.images[index]
