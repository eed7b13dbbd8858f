"""Fixtures of the fault-injection suite: one set of small shards and one uninterrupted
reference pretraining run for the whole session (the kill, signal and crash tests compare their
resumed runs with it bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faultkit import fault_params
from stages import pretrain, shard
from stages.dino.training_state import LATEST
from stages.params import validate_params


@pytest.fixture(scope="session")
def fault_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the fault config: train 2 x 32 samples, val 1 x 32 (digits)."""
    root = tmp_path_factory.mktemp("fault-shards")
    shard.run(validate_params(fault_params(root)))
    return root / "data/shards/digits"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, fault_shards: Path) -> Path:
    """An uninterrupted pretraining run (in this process); returns its root folder."""
    root = tmp_path_factory.mktemp("fault-reference")
    pretrain.run(validate_params(fault_params(root, fault_shards)))
    return root


@pytest.fixture(scope="session")
def reference_teacher(reference_run: Path) -> dict[str, torch.Tensor]:
    """The reference run's final teacher state dict."""
    state = torch.load(reference_run / "checkpoints" / LATEST, weights_only=False)
    return state["teacher"]

