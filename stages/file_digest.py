"""The sha256 of a file's bytes: what manifests, feature metadata and resumable checkpoints
record to tell one input from another."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Bytes read at a time (the whole file is never held in memory).
CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the bytes of the file at `path`, read `chunk` bytes at a time.

    Raises:
        OSError: the file cannot be opened or read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
