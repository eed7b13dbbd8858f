"""The order in which a training stage visits its samples in one epoch, per rank (linear, transfer)."""

from __future__ import annotations

import math

import numpy as np


def epoch_indices(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's sample indices for one epoch, as the reference's DistributedSampler(shuffle=True)
    lays them out: a permutation drawn from ``(seed, epoch)``, padded by wrapping around to a
    multiple of `world_size`, then strided (rank r takes positions r, r + world_size, ...).

    Returns:
        int64 array of ceil(num_samples / world_size) indices (every rank the same count).
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    total = math.ceil(num_samples / world_size) * world_size
    if total > num_samples:
        order = np.concatenate([order, order[: total - num_samples]])
    return order[rank::world_size].astype(np.int64)
