"""The shard format: deterministic writer, size rule, strict reader (every error names shard + key)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.shard_format import (
    Sample,
    ShardError,
    decode_image,
    encode_image,
    iter_samples,
    load_split_arrays,
    manifest_json,
    read_manifest,
    shard_paths,
    write_split,
)

CLASSES = ["a", "b", "c"]


def png(seed: int, size: tuple[int, int] = (6, 5), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def make_samples(n: int, prefix: str = "train") -> list[Sample]:
    return [Sample(key=f"{prefix}_{i:06d}", image=png(i), ext="png", label=i % len(CLASSES)) for i in range(n)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(shard_dir: Path, splits: dict[str, list[tuple[str, int]]], classes=CLASSES) -> None:
    """A manifest for tars already in shard_dir, hashed here independently of the writer."""
    manifest = {
        "format": 1,
        "source": {"name": "test"},
        "classes": classes,
        "splits": {
            split: {
                "total": sum(c for _, c in shards),
                "shards": [
                    {"name": name, "count": count, "bytes": (shard_dir / name).stat().st_size, "sha256": sha256(shard_dir / name)}
                    for name, count in shards
                ],
            }
            for split, shards in splits.items()
        },
    }
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


def write_dataset(shard_dir: Path, train: list[Sample], val: list[Sample], **limits) -> dict:
    limits = {"max_samples": 4, "max_bytes": 1 << 30, **limits}
    splits = {}
    for split, samples in (("train", train), ("val", val)):
        entries = write_split(samples, shard_dir, split, **limits)
        splits[split] = {"total": sum(e["count"] for e in entries), "shards": entries}
    manifest = {"format": 1, "source": {"name": "test"}, "classes": CLASSES, "splits": splits}
    (shard_dir / "manifest.json").write_text(manifest_json(manifest))
    return manifest


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------- writer


def test_same_input_gives_byte_identical_shards_with_fixed_headers(tmp_path: Path) -> None:
    samples = make_samples(7)
    first = write_split(samples, tmp_path / "a", "train", max_samples=3, max_bytes=1 << 20)
    second = write_split(iter(samples), tmp_path / "b", "train", max_samples=3, max_bytes=1 << 20)
    assert first == second
    assert [e["name"] for e in first] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for entry in first:
        a, b = tmp_path / "a" / entry["name"], tmp_path / "b" / entry["name"]
        assert a.read_bytes() == b.read_bytes()
        assert entry["sha256"] == sha256(a) and entry["bytes"] == a.stat().st_size
        assert a.read_bytes()[257:263] == b"ustar\x00"  # POSIX USTAR magic in the first header
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "train_000000.png", "train_000000.cls", "train_000001.png", "train_000001.cls",
            "train_000002.png", "train_000002.cls",
        ]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isreg()) == (0, 0, 0, "", "", 0o644, True)
        assert tar.extractfile(members[0]).read() == samples[0].image
        assert tar.extractfile(members[3]).read() == b"1"


def expected_boundaries(sizes: list[tuple[int, int]], max_samples: int, max_bytes: int) -> list[int]:
    """Shard counts by the tar layout, written out by hand: 512-byte header + data padded to 512
    per member, 1024 zero bytes at the end, the file padded to 10240."""
    counts, count, used = [], 0, 0
    for image_len, cls_len in sizes:
        member = 512 + math.ceil(image_len / 512) * 512 + 512 + math.ceil(cls_len / 512) * 512
        file_size = math.ceil((used + member + 1024) / 10240) * 10240
        if count and (count + 1 > max_samples or file_size > max_bytes):
            counts.append(count)
            count, used = 0, 0
        count += 1
        used += member
    return counts + ([count] if count else [])


def blob_samples(lengths: list[int]) -> list[Sample]:
    return [Sample(key=f"k{i}", image=bytes([i % 256]) * n, ext="png", label=i % 3) for i, n in enumerate(lengths)]


@pytest.mark.parametrize(
    "lengths, max_samples, max_bytes",
    [
        ([100] * 10, 3, 1 << 20),  # by count
        ([9000, 9000, 100, 30000, 100, 100, 5000], 100, 20480),  # by bytes; 30000 alone
        ([20000, 50, 50], 100, 10240),  # first sample larger than the limit: alone
        ([1] * 25, 100, 10240),  # 4 tiny samples (2 KiB each + 1 KiB end) per 10 KiB record
    ],
)
def test_shard_boundaries_follow_count_and_byte_limits(tmp_path: Path, lengths, max_samples, max_bytes) -> None:
    samples = blob_samples(lengths)
    entries = write_split(samples, tmp_path, "train", max_samples=max_samples, max_bytes=max_bytes)
    sizes = [(n, len(str(s.label))) for n, s in zip(lengths, samples)]
    assert [e["count"] for e in entries] == expected_boundaries(sizes, max_samples, max_bytes)
    for entry in entries:
        path = tmp_path / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["bytes"] <= max_bytes or entry["count"] == 1
        assert entry["count"] <= max_samples


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12000), min_size=1, max_size=12),
    max_samples=st.integers(1, 6),
    max_bytes=st.integers(1, 40000),
)
def test_shard_sizes_property(tmp_path_factory, lengths, max_samples, max_bytes) -> None:
    out = tmp_path_factory.mktemp("prop")
    samples = blob_samples(lengths)
    entries = write_split(samples, out, "train", max_samples=max_samples, max_bytes=max_bytes)
    assert sum(e["count"] for e in entries) == len(samples)
    sizes = [(n, len(str(s.label))) for n, s in zip(lengths, samples)]
    assert [e["count"] for e in entries] == expected_boundaries(sizes, max_samples, max_bytes)
    for entry in entries:
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
        assert entry["bytes"] <= max_bytes or entry["count"] == 1


def test_empty_input_writes_no_shard(tmp_path: Path) -> None:
    assert write_split([], tmp_path, "val", 10, 1 << 20) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "sample, match",
    [
        (Sample("a.b", b"x", "png", 0), "a.b"),
        (Sample("ok", b"x", "gif", 0), "gif"),
        (Sample("ok", b"x", "png", -1), "label"),
    ],
)
def test_writer_refuses_bad_samples(tmp_path: Path, sample: Sample, match: str) -> None:
    with pytest.raises(ShardError, match=match):
        write_split([sample], tmp_path, "train", 10, 1 << 20)


def test_writer_refuses_duplicate_keys(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="k0.*twice"):
        write_split(blob_samples([1, 1]) + blob_samples([1]), tmp_path, "train", 10, 1 << 20)


# ---------------------------------------------------------------------------------------------- reader


def test_round_trip_and_shard_selection(tmp_path: Path) -> None:
    train, val = make_samples(10), make_samples(3, "val")
    write_dataset(tmp_path, train, val)
    assert list(iter_samples(tmp_path, "train")) == train
    assert list(iter_samples(tmp_path, "val", verify=False)) == val
    assert [p.name for p in shard_paths(tmp_path, "train")] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert list(iter_samples(tmp_path, "train", shards=[2, "train-000000.tar"])) == train[8:] + train[:4]
    with pytest.raises(ShardError, match="no split 'test'"):
        list(iter_samples(tmp_path, "test"))
    with pytest.raises(ShardError, match="out of range"):
        list(iter_samples(tmp_path, "train", shards=[3]))


def test_reader_matches_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    train = make_samples(5)
    write_dataset(tmp_path, train, make_samples(1, "val"))
    urls = [str(p) for p in shard_paths(tmp_path, "train")]
    read = [(s["__key__"], s["png"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert read == [(s.key, s.image, s.label) for s in train]


def test_sha256_mismatch_and_missing_shard_are_named(tmp_path: Path) -> None:
    write_dataset(tmp_path, make_samples(6), make_samples(2, "val"))
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first image of the second shard; size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256"):
        shard_paths(tmp_path, "train")
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256"):
        list(iter_samples(tmp_path, "train"))
    assert len(list(iter_samples(tmp_path, "train", shards=[0]))) == 4  # the intact shard still reads
    (tmp_path / "val-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"val-000000\.tar: shard listed in the manifest is missing"):
        shard_paths(tmp_path, "val", verify=False)


def test_truncated_tar_names_shard_and_key(tmp_path: Path) -> None:
    write_dataset(tmp_path, make_samples(3), [])
    path = tmp_path / "train-000000.tar"
    data = path.read_bytes()
    # Cut inside the data of the second sample's image (member 3 starts at header 2·1024).
    with tarfile.open(path) as tar:
        second = tar.getmember("train_000001.png")
    path.write_bytes(data[: second.offset_data + 10])
    with pytest.raises(ShardError, match=r"train-000000\.tar.*sample 'train_000001'"):
        list(iter_samples(tmp_path, "train", verify=False))
    with pytest.raises(ShardError, match=r"train-000000\.tar: .*bytes, the manifest says"):
        list(iter_samples(tmp_path, "train", verify=True))
    # Cut exactly at a member boundary: tarfile sees a clean end; the count check catches it.
    third = second.offset_data + math.ceil(second.size / 512) * 512 + 1024  # past train_000001.cls
    path.write_bytes(data[:third])
    with pytest.raises(ShardError, match=r"train-000000\.tar: holds 2 samples \(last key 'train_000001'\).*says 3"):
        list(iter_samples(tmp_path, "train", verify=False))


@pytest.mark.parametrize(
    "members, match",
    [
        ([("x_000000.png", png(0)), ("x_000001.png", png(1)), ("x_000001.cls", b"0")], r"'x_000000' has no x_000000\.cls"),
        ([("x_000000.png", png(0)), ("x_000000.cls", b"zwei")], r"'x_000000'.*not a class index"),
        ([("x_000000.png", png(0)), ("x_000000.cls", b"3")], r"'x_000000'.*class index 3 is out of range.*3 classes"),
        ([("x_000000.png", png(0)), ("x_000000.cls", b"-1")], r"'x_000000'.*not a class index"),
        ([("x_000000.png", png(0)), ("x_000000.txt", b"hi"), ("x_000000.cls", b"1")], r"'x_000000' must have one image"),
        ([("x_000000.cls", b"1")], r"'x_000000' must have one image"),
        ([("x_000000.png", png(0)), ("x_000000.cls", b"1"), ("x_000001.png", png(1)), ("x_000001.cls", b"1"),
          ("x_000000.png", png(0)), ("x_000000.cls", b"1")], r"'x_000000' appears twice"),
    ],
)
def test_malformed_samples_name_shard_and_key(tmp_path: Path, members, match: str) -> None:
    raw_tar(tmp_path / "train-000000.tar", members)
    count = len({name.split(".")[0] for name, _ in members})
    write_manifest(tmp_path, {"train": [("train-000000.tar", count)]})
    with pytest.raises(ShardError, match=r"train-000000\.tar: (sample )?" + match.lstrip("r")) as info:
        list(iter_samples(tmp_path, "train"))  # sha256 matches: the content is what is wrong
    assert "train-000000.tar" in str(info.value)


def test_empty_shard_that_the_manifest_calls_non_empty(tmp_path: Path) -> None:
    raw_tar(tmp_path / "train-000000.tar", [])
    write_manifest(tmp_path, {"train": [("train-000000.tar", 3)]})
    with pytest.raises(ShardError, match=r"train-000000\.tar: holds 0 samples.*manifest says 3"):
        list(iter_samples(tmp_path, "train"))


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "no shard manifest"),
        ("{not json", "not valid JSON"),
        (json.dumps({"format": 2}), "format is 2"),
        (json.dumps({"format": 1, "source": {}, "classes": ["a"], "splits": {"train": {"total": 2, "shards": []}}}),
         "do not add up"),
        (json.dumps({"format": 1, "source": {}, "classes": [], "splits": {}}), "classes"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str | None, match: str) -> None:
    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match=match) as info:
        read_manifest(tmp_path)
    assert "manifest.json" in str(info.value)


# ---------------------------------------------------------------------------------------------- images


def test_encode_image_is_deterministic_and_drops_metadata() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    source = io.BytesIO()
    Image.fromarray(pixels).save(source, format="PNG", icc_profile=b"fake-profile" * 10, dpi=(300, 300))
    with Image.open(io.BytesIO(source.getvalue())) as image:
        image.load()
        assert "icc_profile" in image.info
        encoded = encode_image(image, "png")
    assert encoded == encode_image(pixels, "png")
    assert b"iCCP" not in encoded and b"pHYs" not in encoded and b"tEXt" not in encoded
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels)
    gray = pixels[..., 0]
    with Image.open(io.BytesIO(encode_image(gray, "png"))) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), gray)
    jpg = encode_image(pixels, "jpg", jpeg_quality=90)
    assert jpg[:2] == b"\xff\xd8" and jpg == encode_image(Image.fromarray(pixels), "jpg", jpeg_quality=90)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(pixels.astype(np.float32), "png")


def test_16_bit_grayscale_keeps_its_high_byte() -> None:
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")  # a 16-bit PNG
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.mode.startswith("I")
    pixels = np.asarray(Image.open(io.BytesIO(encode_image(opened, "png"))))
    assert pixels.tolist() == [[0, 3, 156, 255]]  # not [0, 255, 255, 255]


def test_decode_image_gives_rgb_and_names_undecodable_key() -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    image = decode_image(Sample("k", encode_image(gray, "png"), "png", 0))
    assert image.mode == "RGB" and image.size == (6, 5)
    np.testing.assert_array_equal(np.asarray(image), np.repeat(gray[..., None], 3, axis=2))
    with pytest.raises(ShardError, match="sample 'broken_7'"):
        decode_image(Sample("broken_7", b"\x89PNG\r\n\x1a\n garbage", "png", 0))


def test_load_split_arrays_stacks_equal_sizes_and_lists_mixed(tmp_path: Path) -> None:
    train = make_samples(5)
    val = [Sample("val_0", png(1, (4, 4)), "png", 2), Sample("val_1", png(2, (3, 5), "L"), "png", 0)]
    write_dataset(tmp_path, train, val)
    images, labels, keys = load_split_arrays(tmp_path, "train")
    assert images.shape == (5, 5, 6, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[2], np.asarray(Image.open(io.BytesIO(train[2].image))))
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0, 1]
    assert keys == [s.key for s in train]
    images, labels, keys = load_split_arrays(tmp_path, "val")
    assert isinstance(images, list) and [im.shape for im in images] == [(4, 4, 3), (5, 3, 3)]
    assert labels.tolist() == [2, 0] and keys == ["val_0", "val_1"]


def test_failing_input_leaves_no_partial_shard(tmp_path: Path) -> None:
    def samples():
        yield from make_samples(5)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_split(samples(), tmp_path, "train", max_samples=3, max_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # the completed shard only
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert len(tar.getmembers()) == 6
