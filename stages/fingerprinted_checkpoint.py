"""Resumable checkpoints of the evaluation stages that train (linear, transfer): one file,
written atomically after every epoch, resumed only when it was made with the same fingerprint.

The fingerprint is a JSON-like dict of what determines the result (the stage's params without its
run-only keys, hashes of its inputs), stored in the checkpoint under ``"fingerprint"``. A
checkpoint of other params is left alone and training starts from scratch, with a warning naming
the fingerprint keys that differ; a checkpoint that cannot be read stops the stage (deleting it
is the user's decision). Pretraining's checkpoints, kept two deep and checked key by key against
the params, are `stages.dino.training_state`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from stages.atomic import torch_save
from stages.cli import StageError

logger = logging.getLogger(__name__)

#: The checkpoint's file name in the stage's output folder.
CHECKPOINT_NAME = "checkpoint.pth"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (with its ``"fingerprint"``) as ``<directory>/checkpoint.pth`` atomically.

    Returns:
        The checkpoint's path.
    """
    path = Path(directory) / CHECKPOINT_NAME
    torch_save(state, path)
    return path


def load_checkpoint(directory: str | Path, fingerprint: dict[str, Any], what: str = "training") -> dict[str, Any] | None:
    """The checkpoint in `directory` if there is one made with the same `fingerprint`, else None
    (a checkpoint of other params is left alone and training starts from scratch, with a warning).

    Args:
        directory: the stage's output folder.
        fingerprint: what the current run's result depends on.
        what: the stage, named in the error ("linear", "transfer").

    Returns:
        The state dict as saved (tensors on the CPU), or None.

    Raises:
        StageError: the file exists but cannot be read.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: refuse rather than silently start over
        raise StageError(f"{path}: unreadable {what} checkpoint ({exc}); delete it to start over") from exc
    stored = state.get("fingerprint", {})
    if stored != fingerprint:
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        logger.warning("%s was made with other params (%s): starting from scratch", path, ", ".join(changed))
        return None
    return state
