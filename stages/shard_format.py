"""The on-disk shard format: deterministic WebDataset tar files plus a manifest.

A split is stored as ``<split>-000000.tar``, ``<split>-000001.tar``, ... in one folder, next to
``manifest.json``. Each sample is two consecutive tar members: ``<key>.<ext>`` (the encoded image,
``png`` or ``jpg``) and ``<key>.cls`` (the class index as ASCII decimal text), which is the layout
WebDataset reads (its key is the member name up to the first dot, so keys never contain dots).

The writer is byte-deterministic: members in input order, USTAR headers with mtime 0, uid/gid 0,
empty uname/gname and mode 0o644, so the same samples give byte-identical shards (and the same
sha256 in the manifest). The reader is strict and names the shard file and the sample key in every
error, so a damaged shard fails loudly instead of silently training on less data.

Manifest (``manifest.json``, sorted keys)::

    {"format": 1,
     "source": {"name": ..., "root": ..., "subset": ..., "seed": ..., ...},
     "classes": [class names in index order],
     "splits": {"train": {"total": N, "shards": [{"name", "count", "bytes", "sha256"}, ...]},
                "val": {...}}}
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from stages.atomic import atomic_file
from stages.cli import StageError
from stages.file_digest import file_sha256

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
IMAGE_EXTS = ("png", "jpg")
PNG_COMPRESS_LEVEL = 6  # zlib level; fixed so that the same pixels give the same bytes
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive to a multiple of this
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardError(StageError):
    """A shard or the manifest is missing, damaged or inconsistent; the message names the file
    and, where there is one, the sample key."""


@dataclass(frozen=True)
class Sample:
    """One stored sample.

    Attributes:
        key: unique sample key, e.g. ``"train_000123"`` (letters, digits, ``_`` and ``-``; no dots).
        image: the encoded image file (PNG or JPEG bytes).
        ext: the image's extension in the tar, ``"png"`` or ``"jpg"``.
        label: the class index into the manifest's ``classes``.
    """

    key: str
    image: bytes
    ext: str
    label: int


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


def encode_image(
    image: Image.Image | np.ndarray, image_format: Literal["png", "jpg"], jpeg_quality: int = 95
) -> bytes:
    """Encode pixels deterministically: no metadata (no ICC profile, EXIF, text chunks, dpi).

    Grayscale (``L``) stays one channel, 16-bit grayscale becomes 8-bit (the high byte);
    everything else is converted to RGB (alpha is dropped, as the reference's ``pil_loader`` does
    with ``convert("RGB")``).

    Args:
        image: a PIL image, or a uint8 array of shape (H, W) (grayscale) or (H, W, 3) (RGB).
        image_format: ``"png"`` (lossless, zlib level 6) or ``"jpg"`` (baseline, 4:2:0).
        jpeg_quality: JPEG quality 1..100 (only for ``"jpg"``).

    Returns:
        The encoded file's bytes.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        ):
            raise ValueError(
                f"expected a uint8 array of shape (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
            )
        pixels = Image.fromarray(np.ascontiguousarray(image), mode="L" if image.ndim == 2 else "RGB")
    else:
        if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
            # 16-bit grayscale: PIL's conversion would clamp every value above 255 to white
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), mode="L")
        mode = image.mode if image.mode in ("L", "RGB") else "RGB"
        converted = image.convert(mode) if image.mode != mode else image
        # A fresh image carries no .info, so nothing from the source file leaks into the output.
        pixels = Image.frombytes(mode, converted.size, converted.tobytes())
    buffer = io.BytesIO()
    if image_format == "png":
        pixels.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif image_format == "jpg":
        pixels.save(buffer, format="JPEG", quality=jpeg_quality, optimize=False, progressive=False)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_EXTS}, got {image_format!r}")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _member_bytes(size: int) -> int:
    """Bytes one tar member takes: a 512-byte header plus the data padded to 512."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _archive_bytes(members: int) -> int:
    """Final size of a tar holding `members` bytes of members: two zero blocks, padded to 10240."""
    return -(-(members + 2 * _BLOCK) // _RECORD) * _RECORD


def _sample_bytes(sample: Sample) -> int:
    return _member_bytes(len(sample.image)) + _member_bytes(len(str(sample.label)))


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.discard = False  # set when the shard is abandoned: later writes go nowhere

    def write(self, data: bytes) -> int:
        if self.discard:
            return len(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _check_sample(sample: Sample, seen: set[str]) -> None:
    if not _KEY_RE.match(sample.key):
        raise ShardError(
            f"sample key {sample.key!r}: keys may hold only letters, digits, '_' and '-' "
            "(WebDataset splits member names at the first dot)"
        )
    if sample.key in seen:
        raise ShardError(f"sample key {sample.key!r} occurs twice")
    if sample.ext not in IMAGE_EXTS:
        raise ShardError(f"sample {sample.key!r}: image ext {sample.ext!r} is not one of {IMAGE_EXTS}")
    if isinstance(sample.label, bool) or not isinstance(sample.label, (int, np.integer)) or sample.label < 0:
        raise ShardError(f"sample {sample.key!r}: label {sample.label!r} is not a class index >= 0")
    seen.add(sample.key)


class _ShardWriter:
    """Streams samples into one tar, written atomically; `close` returns its manifest entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.member_bytes = 0
        self._file = atomic_file(path, "wb")
        self._open = True
        self._writer = _HashingWriter(self._file.__enter__())
        self._tar = tarfile.open(fileobj=self._writer, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]

    def add(self, sample: Sample) -> None:
        label = str(int(sample.label)).encode("ascii")
        for name, data in ((f"{sample.key}.{sample.ext}", sample.image), (f"{sample.key}.cls", label)):
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.count += 1
        self.member_bytes += _sample_bytes(sample)

    def close(self) -> dict:
        self._tar.close()
        expected = _archive_bytes(self.member_bytes)
        if self._writer.size != expected:  # the size rule of write_split relies on this layout
            raise ShardError(f"{self.path}: wrote {self._writer.size} bytes, expected {expected}")
        self._open = False
        self._file.__exit__(None, None, None)  # flush, fsync, rename
        return {"name": self.path.name, "count": self.count, "bytes": self._writer.size, "sha256": self._writer.sha256.hexdigest()}

    def abort(self) -> None:
        """Drop the temporary file; the shard's path is left as it was."""
        if not self._open:
            return
        self._open = False
        self._writer.discard = True
        with contextlib.suppress(Exception):
            self._tar.close()  # releases tarfile's stream; its bytes are discarded
        error = ShardError(f"{self.path}: writing aborted")
        try:
            self._file.__exit__(ShardError, error, None)
        except ShardError:
            pass


def write_split(
    samples: Iterable[Sample], out_dir: Path, split: str, max_samples: int, max_bytes: int
) -> list[dict]:
    """Write samples, in the given order, into ``<split>-000000.tar``, ``<split>-000001.tar``, ...

    A new shard starts when adding the next sample would make the current one hold more than
    `max_samples` samples or make its file larger than `max_bytes` bytes (the exact tar size:
    headers, padding and end blocks included). A single sample larger than `max_bytes` goes alone
    into its own shard. Each shard is written atomically (temporary file, then rename). An empty
    `samples` writes no shard.

    Args:
        samples: the samples in their final order; consumed once, lazily.
        out_dir: the folder to write into (created if missing).
        split: the split name used as the file prefix, e.g. ``"train"``.
        max_samples: the most samples per shard (>= 1).
        max_bytes: the largest shard file in bytes (>= 1).

    Returns:
        One entry per shard, in order: ``{"name", "count", "bytes", "sha256"}``.
    """
    if max_samples < 1 or max_bytes < 1:
        raise ValueError(f"max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
    if not re.match(r"^[A-Za-z0-9_\-]+$", split):
        raise ValueError(f"split name {split!r} may hold only letters, digits, '_' and '-'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    seen: set[str] = set()
    shard: _ShardWriter | None = None
    try:
        for sample in samples:
            _check_sample(sample, seen)
            if shard is not None and (
                shard.count + 1 > max_samples
                or _archive_bytes(shard.member_bytes + _sample_bytes(sample)) > max_bytes
            ):
                entries.append(shard.close())
                logger.debug("wrote %s: %d samples, %d bytes", shard.path, shard.count, entries[-1]["bytes"])
                shard = None
            if shard is None:
                shard = _ShardWriter(out_dir / f"{split}-{len(entries):06d}.tar")
            shard.add(sample)
        if shard is not None:
            entries.append(shard.close())
            shard = None
    finally:
        if shard is not None:  # an error (bad sample, failing source): no half-written shard
            shard.abort()
    return entries


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------


def _manifest_problem(manifest: Any) -> str | None:
    """The first thing wrong with a parsed manifest, or None."""
    if not isinstance(manifest, dict):
        return "the top level is not a JSON object"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format is {manifest.get('format')!r}, this reader knows format {FORMAT_VERSION}"
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "classes must be a non-empty list of names"
    if not isinstance(manifest.get("source"), dict):
        return "source must be an object"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "splits must be a non-empty object"
    for split, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("total"), int):
            return f"splits.{split}.total must be an integer"
        shards = info.get("shards")
        if not isinstance(shards, list):
            return f"splits.{split}.shards must be a list"
        for i, entry in enumerate(shards):
            if not isinstance(entry, dict) or not (
                isinstance(entry.get("name"), str)
                and "/" not in entry["name"]
                and isinstance(entry.get("count"), int)
                and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)
            ):
                return f"splits.{split}.shards[{i}] must have name, count, bytes and sha256"
        if sum(e["count"] for e in shards) != info["total"]:
            return f"splits.{split}: the shard counts do not add up to total = {info['total']}"
    return None


def read_manifest(shard_dir: str | Path) -> dict:
    """Read and check ``<shard_dir>/manifest.json``.

    Raises:
        ShardError: the manifest is missing, not JSON, or does not have the format above.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ShardError(f"{path}: no shard manifest (run the shard stage first)") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the shard manifest ({exc.strerror})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path}: invalid shard manifest: {problem}")
    return manifest


def manifest_json(manifest: dict) -> str:
    """The manifest's canonical text (sorted keys, indent 2, final newline): byte-stable."""
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"refusing to write an invalid shard manifest: {problem}")
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _split_entries(manifest: dict, shard_dir: Path, split: str) -> list[dict]:
    splits = manifest["splits"]
    if split not in splits:
        raise ShardError(
            f"{shard_dir / MANIFEST_NAME}: no split {split!r}; the manifest has {sorted(splits)}"
        )
    return splits[split]["shards"]


def _verify(path: Path, entry: dict) -> None:
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(f"{path}: shard is {size} bytes, the manifest says {entry['bytes']} (damaged or replaced)")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise ShardError(f"{path}: sha256 {digest} differs from the manifest's {entry['sha256']} (damaged or replaced)")


def shard_paths(shard_dir: str | Path, split: str, verify: bool = True) -> list[Path]:
    """The shard files of a split, in order; with `verify`, each file's size and sha256 are
    checked against the manifest.

    Raises:
        ShardError: naming the shard that is missing or differs from the manifest.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    paths = []
    for entry in _split_entries(manifest, shard_dir, split):
        path = shard_dir / entry["name"]
        if verify:
            _verify(path, entry)
        elif not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def _select(entries: list[dict], shards: Sequence[int | str | Path] | None, where: Path) -> list[dict]:
    if shards is None:
        return entries
    if isinstance(shards, (str, Path, int, np.integer)):
        shards = [shards]  # type: ignore[list-item]
    by_name = {e["name"]: e for e in entries}
    chosen = []
    for shard in shards:
        if isinstance(shard, (int, np.integer)) and not isinstance(shard, bool):
            if not 0 <= shard < len(entries):
                raise ShardError(f"{where}: shard index {shard} out of range (0..{len(entries) - 1})")
            chosen.append(entries[int(shard)])
        else:
            name = Path(shard).name
            if name not in by_name:
                raise ShardError(f"{where}: shard {name!r} is not in this split of the manifest")
            chosen.append(by_name[name])
    return chosen


def _parse_label(path: Path, key: str, data: bytes, num_classes: int) -> int:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not re.fullmatch(r"[0-9]+", text):
        raise ShardError(f"{path}: sample {key!r}: {key}.cls holds {data[:32]!r}, not a class index")
    label = int(text)
    if label >= num_classes:
        raise ShardError(
            f"{path}: sample {key!r}: class index {label} is out of range (the manifest has {num_classes} classes)"
        )
    return label


def _read_shard(path: Path, entry: dict, num_classes: int) -> Iterator[Sample]:
    key: str | None = None  # the sample being assembled
    parts: dict[str, bytes] = {}
    done: set[str] = set()
    count = 0

    def finish() -> Sample:
        cls = parts.pop("cls", None)
        if cls is None:
            raise ShardError(f"{path}: sample {key!r} has no {key}.cls member")
        images = [ext for ext in parts if ext in IMAGE_EXTS]
        others = sorted(set(parts) - set(images))
        if len(images) != 1 or others:
            raise ShardError(
                f"{path}: sample {key!r} must have one image (.png or .jpg) and one .cls, has {sorted(parts) + ['cls']}"
            )
        return Sample(key=key, image=parts[images[0]], ext=images[0], label=_parse_label(path, key, cls, num_classes))  # type: ignore[arg-type]

    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or "/" in name or "." not in name:
                    raise ShardError(f"{path}: unexpected member {name!r} (after sample {key!r})")
                member_key, ext = name.split(".", 1)
                if member_key != key:
                    if key is not None:
                        yield finish()
                        count += 1
                        done.add(key)
                    if member_key in done:
                        raise ShardError(f"{path}: sample {member_key!r} appears twice")
                    key, parts = member_key, {}
                if ext in parts:
                    raise ShardError(f"{path}: sample {key!r} has two {name!r} members")
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b""
            if key is not None:
                yield finish()
                count += 1
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"at sample {key!r}" if key is not None else "before the first sample"
        raise ShardError(f"{path}: unreadable tar {where} ({exc})") from None
    if count != entry["count"]:
        raise ShardError(
            f"{path}: holds {count} samples (last key {key!r}), the manifest says {entry['count']} (truncated?)"
        )


def iter_samples(
    shard_dir: str | Path,
    split: str,
    verify: bool = True,
    shards: Sequence[int | str | Path] | None = None,
) -> Iterator[Sample]:
    """Yield the samples of a split in stored order.

    Opens each tar only while reading it and keeps no state between calls, so it is safe inside
    torch DataLoader workers (give each worker its own `shards`).

    Args:
        shard_dir: the folder with manifest.json and the tars.
        split: ``"train"`` or ``"val"`` (any split the manifest has).
        verify: check each shard's size and sha256 against the manifest before reading it.
        shards: read only these shards, in this order: indices into the split's shard list, or
            shard file names/paths. None reads all.

    Raises:
        ShardError: naming the shard and the sample key for a truncated or damaged tar, a sample
            without its .cls, a .cls that is not an integer or out of range of the manifest's
            classes, or a shard holding a different number of samples than the manifest says.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    num_classes = len(manifest["classes"])
    for entry in _select(_split_entries(manifest, shard_dir, split), shards, shard_dir / MANIFEST_NAME):
        path = shard_dir / entry["name"]
        if verify:
            _verify(path, entry)
        elif not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        yield from _read_shard(path, entry, num_classes)


def decode_image(sample: Sample) -> Image.Image:
    """Decode a sample's image to an RGB PIL image (grayscale and palette images converted).

    Raises:
        ShardError: naming the key when the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ShardError(f"sample {sample.key!r}: undecodable .{sample.ext} image ({exc})") from None


def load_split_arrays(
    shard_dir: str | Path, split: str
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, list[str]]:
    """Decode a whole split into memory (for small datasets, e.g. the raw-pixel baseline).

    Returns:
        images: uint8 array of shape (N, H, W, 3) when all images share one size, else a list
            of N uint8 arrays of shape (H_i, W_i, 3).
        labels: int64 array of shape (N,).
        keys: the N sample keys in stored order.
    """
    images, labels, keys = [], [], []
    for sample in iter_samples(shard_dir, split):
        images.append(np.asarray(decode_image(sample), dtype=np.uint8))
        labels.append(sample.label)
        keys.append(sample.key)
    label_array = np.asarray(labels, dtype=np.int64)
    if images and len({im.shape for im in images}) == 1:
        return np.stack(images), label_array, keys
    if not images:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8), label_array, keys
    return images, label_array, keys
