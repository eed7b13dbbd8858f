"""Training checkpoints written by a background thread, off the training step's critical path.

`AsyncCheckpointSaver.save(state)` copies every tensor of the (nested) state into CPU buffers
kept from one checkpoint to the next, then returns; a thread writes the copy with the atomic,
rotating `save_checkpoint`. The training thread is blocked only for the copy (and, if the previous
checkpoint is still being written, for the rest of that write: at most one is in flight, so the
buffers are free again when they are refilled). The price: one copy of the state in host memory
(pinned where CUDA is, so that the device-to-host copies run at full speed). A failed write is
re-raised on the training thread, unchanged (its message names the file), at the next `save` or
`wait`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from stages.dino.training_state import save_checkpoint

logger = logging.getLogger(__name__)


class AsyncCheckpointSaver:
    """Args:
        directory: the checkpoint folder (checkpoint.pth, checkpoint.prev.pth).
        write: `write(directory, state) -> path`; default: the atomic, rotating `save_checkpoint`
            (looked up when the saver is made, so that tests can slow it down or make it fail).
    """

    def __init__(self, directory: str | Path, write: Callable[[Path, dict], Path] | None = None):
        self.directory = Path(directory)
        self.write = write or save_checkpoint
        self.last_written: Path | None = None  # the newest checkpoint that is completely on disk
        self._buffers: dict[tuple, torch.Tensor] = {}  # by position in the state: ("student", "head.w")
        self._pin = torch.cuda.is_available()  # pinned memory makes non_blocking device copies async
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any]) -> None:
        """Snapshot `state` (later in-place updates of its tensors do not reach the file) and
        start writing it. Raises the previous write's error, if it failed."""
        self.wait()
        snapshot = self._snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the checkpoint in flight (if any) is on disk; return the newest written
        checkpoint's path (None before the first). Re-raises the writer's exception."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.last_written

    def _write(self, snapshot: dict) -> None:
        try:
            path = self.write(self.directory, snapshot)
        except BaseException as exc:  # handed to the training thread, which raises it
            self._error = exc
            return
        self.last_written = path
        logger.info("checkpoint at step %s -> %s", snapshot.get("global_step"), path)

    def _snapshot(self, state: dict) -> dict:
        used: dict[tuple, torch.Tensor] = {}
        from_cuda: set[torch.device] = set()

        def copy(obj: Any, position: tuple) -> Any:
            if isinstance(obj, torch.Tensor):
                buffer = self._buffers.get(position)
                if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                    buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=self._pin)
                buffer.copy_(obj.detach(), non_blocking=True)
                if obj.is_cuda:
                    from_cuda.add(obj.device)
                used[position] = buffer
                return buffer
            if isinstance(obj, dict):
                out = type(obj)((k, copy(v, (*position, k))) for k, v in obj.items())
                if hasattr(obj, "_metadata"):  # module state dicts carry their modules' versions
                    out._metadata = obj._metadata
                return out
            if isinstance(obj, (list, tuple)):
                items = [copy(v, (*position, i)) for i, v in enumerate(obj)]
                return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
            return obj

        snapshot = copy(state, ())
        for device in from_cuda:  # one wait for all the non_blocking device-to-host copies
            torch.cuda.synchronize(device)
        self._buffers = used  # buffers of tensors that are gone are freed
        return snapshot
