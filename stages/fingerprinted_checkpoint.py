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
from typing import Any, Mapping

import torch

from stages.atomic import torch_save
from stages.cli import StageError

logger = logging.getLogger(__name__)

#: The checkpoint's file name in the stage's output folder.
CHECKPOINT_NAME = "checkpoint.pth"
#: The best evaluation before any ("top1", "top5" in percent, 1-based "epoch"): any top-1 beats it.
NO_BEST: dict[str, float] = {"top1": -1.0, "top5": 0.0, "epoch": 0}


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


def resume(directory: str | Path, fingerprint: dict[str, Any], what: str,
           stateful: Mapping[str, Any]) -> tuple[int, list[dict[str, float]], dict[str, float]]:
    """Where a training stage starts: after the epochs of the matching checkpoint in `directory`
    (see `load_checkpoint`), or from scratch.

    The checkpoint holds, besides each of `stateful`'s state dicts under its key, ``"epoch"`` (the
    epochs done), ``"history"`` (one row per epoch) and ``"best"`` (the best evaluation so far).

    Args:
        directory: the stage's output folder.
        fingerprint: what the current run's result depends on.
        what: the stage, named in the error and the log.
        stateful: checkpoint key -> object with ``load_state_dict`` (model, optimizer), loaded in
            place when a checkpoint is resumed.

    Returns:
        ``(start_epoch, history, best)``; from scratch ``(0, [], NO_BEST)`` (a copy).

    Raises:
        StageError: the file exists but cannot be read.
    """
    state = load_checkpoint(directory, fingerprint, what)
    if state is None:
        return 0, [], dict(NO_BEST)
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])
    start_epoch = int(state["epoch"])
    logger.info("%s: resumed from %s after epoch %d", what, Path(directory) / CHECKPOINT_NAME, start_epoch)
    return start_epoch, list(state["history"]), dict(state["best"])
