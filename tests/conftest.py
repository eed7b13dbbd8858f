"""Shared fixtures; the tiny configuration itself lives in tiny_config.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_config import tiny_params


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    return tiny_params(tmp_path)
