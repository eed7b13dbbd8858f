"""Training checkpoints: written atomically, kept two deep, resumed only when they match the run.

`checkpoint.pth` is the latest and `checkpoint.prev.pth` the one before it. A new checkpoint is
written to a temporary file and renamed over `checkpoint.pth` after the old one was hard-linked to
`checkpoint.prev.pth`, so at every instant at least one complete checkpoint exists. On resume a
file that fails to load (truncated, corrupt) is named in the log and the previous one is used.

The student/teacher dicts use the reference implementation's key layout ("backbone."/"head."
prefixes), so its tools and our `load_backbone` read these files alike.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic_core import to_jsonable_python

from stages.atomic import torch_save
from stages.params import Params

logger = logging.getLogger(__name__)

LATEST = "checkpoint.pth"
PREVIOUS = "checkpoint.prev.pth"

# Keys that change how a run is executed or logged but not what it computes; a checkpoint whose
# params differ only in these is resumed.
RUN_ONLY_KEYS = {
    "num_workers", "device", "checkpoint_every_steps", "async_checkpoint", "log_every_steps",
    "collapse_patience_steps", "stop_on_collapse", "inject_nonfinite_at_step", "cuda_graphs",
    "decoded_cache_mib",
}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's GPU only: a resume may see other GPUs
    return state


def all_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (each rank resumes its own stream)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


def set_rng_state(state: dict) -> None:
    # RNG states must be CPU byte tensors, wherever the checkpoint was loaded to (a GPU resume
    # maps every tensor to the GPU)
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # checkpoints before 2026-12-08 hold every visible GPU's
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda.cpu())


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` as the latest checkpoint; the former latest becomes the previous one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    latest, previous = directory / LATEST, directory / PREVIOUS
    if latest.exists():
        link = directory / f".{PREVIOUS}.link"
        link.unlink(missing_ok=True)
        os.link(latest, link)
        os.replace(link, previous)
    torch_save(state, latest)
    return latest


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest checkpoint that loads, or None when there is none. A file that exists but does
    not load is reported by name and skipped."""
    directory = Path(directory)
    for path in (directory / LATEST, directory / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or "global_step" not in state:
                raise ValueError("not a training checkpoint (no global_step)")
            return state, path
        except Exception as exc:  # truncated zip, pickle error, wrong content
            logger.error("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None


def set_aside_unreadable(directory: str | Path) -> None:
    """After resuming from the previous checkpoint, move the unreadable latest out of the way
    (kept as checkpoint.pth.unreadable for inspection), so that the next save does not rotate it
    into the previous slot and the run stays two checkpoints deep."""
    latest = Path(directory) / LATEST
    if latest.exists():
        os.replace(latest, latest.with_name(LATEST + ".unreadable"))


def params_mismatch(saved: dict, current: dict) -> list[str]:
    """Dotted keys of the model/pretrain/dataset sections that differ, ignoring run-only keys. A
    key the checkpoint's params lack (written before the key existed) counts as its default, so
    adding a key with a default that keeps the old behaviour does not restart running trainings."""
    differences = []
    for section in ("dataset", "model", "pretrain"):
        old, new = saved.get(section, {}), current.get(section, {})
        fields = Params.model_fields[section].annotation.model_fields
        for key in sorted(set(old) | set(new)):
            if key in RUN_ONLY_KEYS:
                continue
            before = old[key] if key in old else _schema_default(fields.get(key))
            if before != new.get(key):
                differences.append(f"{section}.{key}")
    return differences


def _schema_default(field: Any) -> Any:
    """A params field's default as the params file would spell it (None for an unknown key)."""
    return None if field is None else to_jsonable_python(field.get_default(call_default_factory=True))
