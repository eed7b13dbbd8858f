"""Sources on tiny data in their real on-disk layouts, the real Fashion-MNIST, and subsets."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.cli import StageError
from stages.sources import BadImageError, class_quotas, sample_key, stratified_subset
from stages.sources.cifar import Cifar
from stages.sources.digits import Digits
from stages.sources.fashion_mnist import CLASSES as FMNIST_CLASSES
from stages.sources.fashion_mnist import FashionMNIST, read_idx
from stages.sources.imagefolder import ImageFolder

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# ---------------------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX by the format's description: 0, 0, type 0x08, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int, n_val: int, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(root / f"{name}.gz", "wb") as handle:
                    handle.write(idx_bytes(array))
            else:
                (root / name).write_bytes(idx_bytes(array))
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    data = write_fmnist(tmp_path, 7, 3, gz=gz)
    source = FashionMNIST(tmp_path)
    assert source.classes() == FMNIST_CLASSES
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = data[prefix]
        np.testing.assert_array_equal(source.labels(split), labels.astype(np.int64))
        assert source.labels(split).dtype == np.int64
        for i in range(len(images)):
            np.testing.assert_array_equal(source.load(split, i), images[i])


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path, 4, 2)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as handle:  # an images header where labels belong
        handle.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 1, 1, 1) + b"\0")
    with pytest.raises(StageError, match=r"train-labels-idx1-ubyte\.gz: bad IDX magic number 0x00000803, expected 0x00000801"):
        FashionMNIST(tmp_path).labels("train")
    with gzip.open(bad, "wb") as handle:  # says 5 labels, holds 4
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\0\1\2\3")
    with pytest.raises(StageError, match=r"train-labels-idx1-ubyte\.gz: IDX dimensions \(5,\) need 5 data bytes, the file has 4"):
        read_idx(bad, 1)
    with gzip.open(bad, "wb") as handle:  # 3 labels for 4 images
        handle.write(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(StageError, match=r"4 images but .*train-labels-idx1-ubyte\.gz has 3 labels"):
        FashionMNIST(tmp_path).labels("train")
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(StageError, match=r"train-labels-idx1-ubyte\.gz: cannot read IDX file"):
        FashionMNIST(tmp_path).labels("train")
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(StageError, match=r"t10k-images-idx3-ubyte\.gz: Fashion-MNIST file not found"):
        FashionMNIST(tmp_path).labels("val")


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    source = FashionMNIST(FMNIST_ROOT)
    for split, prefix, n in (("train", "train", 60000), ("val", "t10k", 10000)):
        labels = source.labels(split)
        assert len(labels) == n and np.bincount(labels).tolist() == [n // 10] * 10  # balanced release
        with gzip.open(FMNIST_ROOT / f"{prefix}-labels-idx1-ubyte.gz") as handle:
            raw = handle.read()
        np.testing.assert_array_equal(labels, np.frombuffer(raw[8:], np.uint8))  # header: magic + count
        with gzip.open(FMNIST_ROOT / f"{prefix}-images-idx3-ubyte.gz") as handle:
            head = handle.read(16 + 3 * 784)
        for i in range(3):
            np.testing.assert_array_equal(source.load(split, i), np.frombuffer(head[16 + 784 * i : 16 + 784 * (i + 1)], np.uint8).reshape(28, 28))
    assert source.labels("val")[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the release's first test labels


# ---------------------------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_disjoint_and_scaled() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    source = Digits(val_fraction=0.2, seed=3)
    assert source.classes() == [str(i) for i in range(10)]
    n_val = math.ceil(1797 * 0.2)
    train, val = source.labels("train"), source.labels("val")
    assert len(val) == n_val == 360 and len(train) == 1797 - 360
    counts = np.bincount(bunch.target, minlength=10)
    assert np.all(np.abs(np.bincount(val, minlength=10) - counts * n_val / 1797) < 1)
    # Together the splits hold every image exactly once (compared as pixels + label).
    from collections import Counter

    scaled = np.clip(np.rint(bunch.images * 255 / 16), 0, 255).astype(np.uint8)
    expected = Counter((scaled[i].tobytes(), int(bunch.target[i])) for i in range(len(scaled)))
    got = Counter()
    for split, labels in (("train", train), ("val", val)):
        for i in range(len(labels)):
            image = source.load(split, i)
            assert image.dtype == np.uint8 and image.shape == (8, 8)
            got[(image.tobytes(), int(labels[i]))] += 1
    assert got == expected
    again = Digits(val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.labels("val"), val)
    assert source.load("val", 5).tobytes() == again.load("val", 5).tobytes()
    other = Digits(val_fraction=0.2, seed=4)
    assert not all(np.array_equal(other.load("val", i), source.load("val", i)) for i in range(20))


# ---------------------------------------------------------------------------------------------- CIFAR


class Py2Pickler(pickle._Pickler):  # type: ignore[misc]
    """Pickles bytes as Python 2 `str` (BINSTRING), as the official CIFAR files were written."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump(path: Path, obj: dict, style: str) -> None:
    buffer = io.BytesIO()
    if style == "py2":
        Py2Pickler(buffer, protocol=2).dump(obj)
    else:
        pickle.dump(obj, buffer, protocol=4)
    path.write_bytes(buffer.getvalue())


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(folder: Path, per_batch: int, style: str) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, style)
    out = {"train": ([], []), "val": ([], [])}
    for name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "val")]:
        rows, labels = cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        dump(folder / name, {
            b"batch_label": name.encode(), b"labels": labels, b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }, style)
        out[split][0].append(rows)
        out[split][1].extend(labels)
    return {split: (np.concatenate(r), np.asarray(l)) for split, (r, l) in out.items()}


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_batches(tmp_path: Path, style: str) -> None:
    data = write_cifar10(tmp_path / "cifar-10-batches-py", 4, style)
    if style == "py2":  # the file really is Python-2 style: keys read as bytes with encoding="bytes"
        assert b"data" in pickle.loads((tmp_path / "cifar-10-batches-py/test_batch").read_bytes(), encoding="bytes")
    source = Cifar(tmp_path)
    assert source.variant == "cifar10" and source.classes()[:3] == ["airplane", "automobile", "bird"]
    for split in ("train", "val"):
        rows, labels = data[split]
        assert source.labels(split).tolist() == labels.tolist()
        for i in (0, len(rows) - 1):
            image = source.load(split, i)
            assert image.shape == (32, 32, 3)
            for y, x in ((0, 0), (0, 31), (5, 7), (31, 31)):  # R, G, B planes, row-major
                assert image[y, x].tolist() == [rows[i, c * 1024 + y * 32 + x] for c in range(3)]
    assert len(source.labels("train")) == 20 and len(source.labels("val")) == 4


def test_cifar100_at_root_with_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    fine = [f"class{i}".encode() for i in range(100)]
    dump(tmp_path / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20}, "py2")
    batches = {}
    for name in ("train", "test"):
        rows = cifar_rows(rng, 6)
        fine_labels = [99, 0, 5, 42, 7, 99]
        dump(tmp_path / name, {b"data": rows, b"fine_labels": fine_labels, b"coarse_labels": [1] * 6,
                               b"filenames": [b"f"] * 6, b"batch_label": name.encode()}, "py2")
        batches[name] = rows
    source = Cifar(tmp_path)
    assert source.variant == "cifar100" and len(source.classes()) == 100 and source.classes()[42] == "class42"
    assert source.labels("val").tolist() == [99, 0, 5, 42, 7, 99]
    np.testing.assert_array_equal(source.load("val", 3), batches["test"][3].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no CIFAR files"):
        Cifar(tmp_path)
    write_cifar10(tmp_path / "cifar-10-batches-py", 2, "py3")
    (tmp_path / "cifar-10-batches-py/data_batch_3").unlink()
    with pytest.raises(StageError, match=r"data_batch_3: CIFAR batch missing"):
        Cifar(tmp_path).labels("train")
    dump(tmp_path / "cifar-10-batches-py/data_batch_3", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "py3")
    with pytest.raises(StageError, match=r"data_batch_3: data must be uint8 rows of 3072"):
        Cifar(tmp_path).labels("train")
    dump(tmp_path / "cifar-10-batches-py/data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "py3")
    with pytest.raises(StageError, match=r"data_batch_3: label 10 at row 1 is out of range"):
        Cifar(tmp_path).labels("train")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py/data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(StageError, match=r"data_batch_3: not a CIFAR python pickle.*builtins\.print is not allowed"):
        Cifar(tmp_path).labels("train")
    dump(tmp_path / "meta", {b"fine_label_names": [b"x"]}, "py3")
    dump(tmp_path / "test", {b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []}, "py3")
    with pytest.raises(StageError, match="holds both CIFAR-10"):
        Cifar(tmp_path)


# ---------------------------------------------------------------------------------------------- ImageFolder


def save(path: Path, array: np.ndarray, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path.read_bytes()


def test_imagefolder_layout_order_and_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pix = lambda: rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)  # noqa: E731
    jpeg = save(tmp_path / "train/zebra/b.JPG", pix(), "JPEG")
    save(tmp_path / "train/zebra/a.png", pix(), "PNG")
    save(tmp_path / "train/zebra/sub/c.bmp", pix(), "BMP")
    save(tmp_path / "train/apple/x.jpeg", pix(), "JPEG")
    save(tmp_path / "train/apple/y.webp", pix(), "WEBP")
    (tmp_path / "train/apple/notes.txt").write_text("not an image")
    (tmp_path / "train/apple/z.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt
    save(tmp_path / "train/.hidden/q.png", pix(), "PNG")
    save(tmp_path / "val/zebra/v.png", pix(), "PNG")
    (tmp_path / "val/empty").mkdir()
    (tmp_path / "train/empty").mkdir()

    source = ImageFolder(tmp_path, image_format="jpg")
    assert source.classes() == ["apple", "empty", "zebra"]
    assert source.labels("train").tolist() == [0, 0, 0, 2, 2, 2]
    assert [source.path("train", i).relative_to(tmp_path).as_posix() for i in range(6)] == [
        "train/apple/x.jpeg", "train/apple/y.webp", "train/apple/z.png",
        "train/zebra/a.png", "train/zebra/b.JPG", "train/zebra/sub/c.bmp",
    ]
    assert source.labels("val").tolist() == [2]
    assert source.load("train", 4) == jpeg  # JPEG passes through byte for byte
    assert isinstance(source.load("train", 1), Image.Image)  # webp is decoded for re-encoding
    with pytest.raises(BadImageError) as info:
        source.load("train", 2)
    assert info.value.location == str(tmp_path / "train/apple/z.png")
    png_source = ImageFolder(tmp_path, image_format="png")
    decoded = png_source.load("train", 4)
    assert isinstance(decoded, Image.Image) and decoded.size == (12, 10)

    save(tmp_path / "val/kiwi/k.png", pix(), "PNG")
    with pytest.raises(StageError, match=r"val/kiwi: class 'kiwi' is not a class of"):
        ImageFolder(tmp_path).labels("val")
    with pytest.raises(StageError, match=r"missing; imagefolder expects"):
        ImageFolder(tmp_path / "train")


def test_truncated_jpeg_is_bad(tmp_path: Path) -> None:
    data = save(tmp_path / "train/a/full.jpg", np.full((64, 64, 3), 200, np.uint8), "JPEG")
    (tmp_path / "train/a/cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "val").mkdir()
    source = ImageFolder(tmp_path, image_format="jpg")
    assert source.path("train", 0).name == "cut.jpg"
    with pytest.raises(BadImageError, match="cut.jpg"):
        source.load("train", 0)
    assert source.load("train", 1) == data


# ---------------------------------------------------------------------------------------------- subsets


def hamilton(counts: list[int], n: int) -> list[int]:
    """Largest-remainder apportionment with exact fractions, written out as a loop."""
    from fractions import Fraction

    total = sum(counts)
    shares = [Fraction(c * n, total) for c in counts]
    quotas = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(counts)), key=lambda k: (-(shares[k] - quotas[k]), k))
    for k in by_remainder[: n - sum(quotas)]:
        quotas[k] += 1
    return quotas


@pytest.mark.parametrize(
    "counts, n",
    [([10, 10, 10], 7), ([50, 30, 20], 10), ([1, 1, 98], 3), ([3, 0, 5], 8), ([6000] * 10, 200), ([7, 13, 2, 9], 0)],
)
def test_class_quotas_match_largest_remainder(counts: list[int], n: int) -> None:
    quotas = class_quotas(np.asarray(counts), n)
    assert quotas.tolist() == hamilton(counts, n)
    assert quotas.sum() == n and np.all(quotas <= counts)


def test_stratified_subset_is_proportional_sorted_and_seeded() -> None:
    rng = np.random.default_rng(5)
    labels = rng.choice(4, size=1000, p=[0.5, 0.25, 0.2, 0.05])
    counts = np.bincount(labels)
    subset = stratified_subset(labels, 120, seed=0)
    assert len(subset) == 120 and len(set(subset.tolist())) == 120
    assert np.all(np.diff(subset) > 0)  # source order kept
    got = np.bincount(labels[subset], minlength=4)
    assert np.all(np.abs(got - counts * 120 / 1000) < 1)
    np.testing.assert_array_equal(subset, stratified_subset(labels, 120, seed=0))
    assert not np.array_equal(subset, stratified_subset(labels, 120, seed=1))
    np.testing.assert_array_equal(stratified_subset(labels, None, 0), np.arange(1000))
    np.testing.assert_array_equal(stratified_subset(labels, 5000, 0), np.arange(1000))


def test_sample_keys_are_stable_and_dot_free() -> None:
    assert sample_key("train", 123, 60000) == "train_000123"
    assert sample_key("val", 5, 1_281_167) == "val_0000005"
    assert sample_key("val", 0, 0) == "val_000000"
