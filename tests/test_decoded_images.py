"""Training images decoded once into memory (`pretrain.decoded_cache_mib`): the loader's batches,
bit for bit, and the same training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_config import tiny_params
from stages import shard
from stages.dino.data import DecodedImages, EpochBatches, ShardImages, decode_uint8
from stages.distributed import init_distributed
from stages.params import validate_params
from stages.pretrain import Trainer
from stages.shard_format import ShardError


def trainer(root: Path, shards: Path, cache_mib: int) -> Trainer:
    params = tiny_params(root, pretrain={"augment": "batch", "decoded_cache_mib": cache_mib, "num_workers": 1})
    params["paths"]["shards"] = str(shards)
    return Trainer(validate_params(params), init_distributed())


def test_epoch_batches_are_strided_slices_of_global_batches():
    # 10 samples, 2 per rank, 2 ranks: global batches of 4, 2 steps, the last 2 samples dropped
    order = np.random.default_rng([5, 3]).permutation(10)
    for rank in (0, 1):
        sampler = EpochBatches(10, 2, seed=5, epoch=3, rank=rank, world_size=2)
        expected = [[order[4 * step + rank], order[4 * step + rank + 2]] for step in range(2)]
        assert sampler.index_batches().tolist() == expected
        assert list(sampler) == [[(3, i) for i in batch] for batch in expected]
        resumed = EpochBatches(10, 2, seed=5, epoch=3, rank=rank, world_size=2, start_step=1)
        assert resumed.index_batches().tolist() == expected[1:]


def test_memory_gives_the_loaders_batches_and_the_same_training(tmp_path, shards):
    from_memory, from_shards = trainer(tmp_path / "a", shards, 1024), trainer(tmp_path / "b", shards, 0)
    assert from_memory.decoded is not None and from_shards.decoded is None
    for epoch, start_step in ((0, 0), (1, 3)):  # a resumed epoch too
        memory = list(from_memory.batches(epoch, start_step))
        loaded = list(from_shards.batches(epoch, start_step))
        assert len(memory) == len(loaded) == 9 - start_step
        assert all(a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(memory, loaded))
    # each trained right after it is made: both start from the RNG state the Trainer seeds
    a = trainer(tmp_path / "c", shards, 1024).fit()
    b = trainer(tmp_path / "d", shards, 0).fit()
    assert a["loss"] == b["loss"] and a["loss_first_epoch"] == b["loss_first_epoch"]


def test_images_over_the_budget_stay_on_disk(shards):
    dataset = ShardImages(shards, "train", decode_uint8, random_transform=False)
    first, _ = dataset[(0, 0)]
    size = len(dataset) * first.numel()
    assert DecodedImages.decode(dataset, torch.device("cpu"), size - 1) is None
    assert DecodedImages.decode(dataset, torch.device("cpu"), size).images.shape == (len(dataset), *first.shape)


def test_images_of_two_sizes_are_an_error_naming_a_sample(tmp_path):
    for cls, (height, width) in (("cat", (20, 24)), ("dog", (16, 16))):
        for split in ("train", "val"):
            folder = tmp_path / "src" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((height, width), 40 * i, np.uint8)).save(folder / f"{i}.png")
    params = tiny_params(tmp_path, dataset={"source": "imagefolder", "root": str(tmp_path / "src"),
                                            "subset": {"train": None, "val": None}})
    shard.run(validate_params(params))
    dataset = ShardImages(params["paths"]["shards"], "train", decode_uint8, random_transform=False)
    with pytest.raises(ShardError, match=r"one size: sample 'train_000000' is \(1, 20, 24\), sample "
                                         r"'train_000004' \(1, 16, 16\)"):
        DecodedImages.decode(dataset, torch.device("cpu"), 2**20, batch_size=4)
