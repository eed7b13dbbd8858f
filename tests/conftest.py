"""Shared fixtures; the tiny configuration itself lives in tiny_config.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_config import tiny_params


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    return tiny_params(tmp_path)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The tiny config's digits shards, written once for the session; tests only read them."""
    from stages import shard
    from stages.params import validate_params

    root = tmp_path_factory.mktemp("shards")
    shard.run(validate_params(tiny_params(root)))
    return root / "data/shards/digits"


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (two cores are shared by parallel suites), restored
    after it. Use in a module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
