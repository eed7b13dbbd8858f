"""Stage `shard` end to end on tiny data: outputs, determinism, subsets, bad images, exit codes."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import shard
from stages.params import validate_params
from stages.shard_format import decode_image, iter_samples, read_manifest, shard_paths
from tiny_config import tiny_params, write_params

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def run_shard(out: Path, **dataset) -> tuple[dict, Path]:
    params = tiny_params(out, dataset=dataset)
    metrics = shard.run(validate_params(params))
    return metrics, Path(params["paths"]["shards"])


def shas(shard_dir: Path) -> dict[str, str]:
    manifest = read_manifest(shard_dir)
    return {e["name"]: e["sha256"] for split in manifest["splits"].values() for e in split["shards"]}


def test_digits_tiny_run_writes_shards_manifest_and_metrics(tmp_path: Path) -> None:
    metrics, shard_dir = run_shard(tmp_path / "a")
    assert metrics == {
        "classes": 10, "bad_images": 0, "train_images": 300, "val_images": 100,
        "train_shards": 3, "val_shards": 1,
        "train_bytes": metrics["train_bytes"], "val_bytes": metrics["val_bytes"],
    }
    assert json.loads((tmp_path / "a/metrics/shard.json").read_text()) == metrics
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
    ]
    manifest = read_manifest(shard_dir)
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["source"]["name"] == "digits" and manifest["source"]["subset"] == {"train": 300, "val": 100}
    assert [e["count"] for e in manifest["splits"]["train"]["shards"]] == [100, 100, 100]
    assert metrics["train_bytes"] == sum(p.stat().st_size for p in shard_paths(shard_dir, "train"))
    # the manifest is written with sorted keys: its bytes are the canonical dump
    assert (shard_dir / "manifest.json").read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    samples = list(iter_samples(shard_dir, "train"))
    keys = [s.key for s in samples]
    assert len(set(keys)) == 300 and keys == sorted(keys) and all("." not in k for k in keys)
    image = decode_image(samples[0])
    assert image.size == (8, 8) and image.mode == "RGB"
    # subset stratified: each class near its share of the 1437-image digits train split
    counts = np.bincount([s.label for s in samples], minlength=10)
    assert counts.sum() == 300 and counts.min() >= 28 and counts.max() <= 32

    # rerun elsewhere: byte-identical shards
    _, other = run_shard(tmp_path / "b")
    assert shas(other) == shas(shard_dir)
    for name in shas(shard_dir):
        assert (other / name).read_bytes() == (shard_dir / name).read_bytes()


def test_seed_changes_the_subset_and_workers_do_not_change_bytes(tmp_path: Path) -> None:
    _, serial = run_shard(tmp_path / "serial", subset={"train": 120, "val": 40})
    _, parallel = run_shard(tmp_path / "parallel", subset={"train": 120, "val": 40}, num_workers=2)
    assert shas(parallel) == shas(serial)
    _, reseeded = run_shard(tmp_path / "seed1", subset={"train": 120, "val": 40}, seed=1)
    assert shas(reseeded) != shas(serial)


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_subset(tmp_path: Path) -> None:
    metrics, shard_dir = run_shard(
        tmp_path, source="fashion-mnist", root=str(FMNIST_ROOT), subset={"train": 200, "val": 100}, shard_max_samples=64
    )
    assert (metrics["train_images"], metrics["val_images"], metrics["train_shards"], metrics["val_shards"]) == (200, 100, 4, 2)
    with gzip.open(FMNIST_ROOT / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read()[8:], np.uint8)
    with gzip.open(FMNIST_ROOT / "t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read()[16:], np.uint8).reshape(-1, 28, 28)
    samples = list(iter_samples(shard_dir, "val"))
    assert np.bincount([s.label for s in samples]).tolist() == [10] * 10  # balanced test set: 10 per class
    for sample in samples:
        index = int(sample.key.removeprefix("val_"))  # the key is the index in the release's order
        assert sample.label == labels[index] and sample.ext == "png"
        np.testing.assert_array_equal(np.asarray(decode_image(sample))[..., 0], images[index])
    assert read_manifest(shard_dir)["classes"][9] == "Ankle boot"


def write_imagefolder(root: Path, corrupt: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    jpegs = {}
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")][i % 3]
                Image.fromarray(pixels).save(folder / f"{i}.{ext}", format=fmt)
                if fmt == "JPEG":
                    jpegs[f"{split}/{cls}/{i}.jpg"] = (folder / f"{i}.{ext}").read_bytes()
    for i in range(corrupt):
        (root / "train" / "cat" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return jpegs


def test_imagefolder_passes_jpeg_through_and_skips_bad_files(tmp_path: Path, caplog) -> None:
    jpegs = write_imagefolder(tmp_path / "src", corrupt=1)
    with caplog.at_level(logging.WARNING):
        metrics, shard_dir = run_shard(
            tmp_path, source="imagefolder", root=str(tmp_path / "src"), image_format="jpg",
            subset={"train": None, "val": None}, max_bad_fraction=0.1,
        )
    assert metrics["bad_images"] == 1 and metrics["train_images"] == 12 and metrics["val_images"] == 4
    assert "broken0.jpg" in caplog.text
    manifest = read_manifest(shard_dir)
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["source"]["skipped"] == [str(tmp_path / "src/train/cat/broken0.jpg")]
    samples = list(iter_samples(shard_dir, "train"))
    assert all(s.ext == "jpg" for s in samples)
    # sorted files per class: cat/0.jpg 1.png 2.bmp 3.jpg 4.png 5.bmp broken0.jpg (skipped); dog/...
    assert [s.key for s in samples][:7] == [f"train_{i:06d}" for i in (0, 1, 2, 3, 4, 5, 7)]
    assert samples[0].image == jpegs["train/cat/0.jpg"]  # byte for byte
    assert samples[6].image == jpegs["train/dog/0.jpg"] and samples[6].label == 1
    assert samples[1].image[:2] == b"\xff\xd8" and samples[1].image != (tmp_path / "src/train/cat/1.png").read_bytes()


def test_too_many_bad_images_fail_through_main_and_keep_old_output(tmp_path: Path, caplog) -> None:
    write_imagefolder(tmp_path / "src", corrupt=2)
    params = tiny_params(tmp_path, dataset={
        "source": "imagefolder", "root": str(tmp_path / "src"), "subset": {"train": None, "val": None},
        "max_bad_fraction": 0.2,
    })
    path = write_params(tmp_path / "params.yaml", params)
    assert shard.main(["--params", str(path)]) == 0  # 2 of 18 = 0.11 <= 0.2
    before = shas(Path(params["paths"]["shards"]))

    params["dataset"]["max_bad_fraction"] = 0.1
    write_params(path, params)
    with caplog.at_level(logging.ERROR):
        assert shard.main(["--params", str(path)]) == 1
    message = caplog.text
    assert "2 of 18 selected images are unreadable" in message
    assert "fraction 0.1111 > dataset.max_bad_fraction = 0.1" in message
    assert "broken0.jpg" in message and "broken1.jpg" in message
    assert shas(Path(params["paths"]["shards"])) == before  # the failed run replaced nothing
    assert not [p for p in Path(params["paths"]["shards"]).parent.iterdir() if p.name.endswith(".tmp")]


def test_cifar_source_through_the_stage(tmp_path: Path) -> None:
    folder = tmp_path / "src/cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": rows[name], b"labels": list(range(10))}))
    metrics, shard_dir = run_shard(tmp_path, source="cifar", root=str(tmp_path / "src"), subset={"train": 20, "val": None})
    assert (metrics["train_images"], metrics["val_images"], metrics["classes"]) == (20, 10, 10)
    val = list(iter_samples(shard_dir, "val"))
    assert [s.label for s in val] == list(range(10))
    np.testing.assert_array_equal(np.asarray(decode_image(val[4])), rows["test_batch"][4].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.bincount([s.label for s in iter_samples(shard_dir, "train")]).tolist() == [2] * 10


def test_missing_source_file_fails_with_its_name(tmp_path: Path, caplog) -> None:
    root = tmp_path / "fmnist"
    root.mkdir()
    path = write_params(tmp_path / "params.yaml", tiny_params(tmp_path, dataset={"source": "fashion-mnist", "root": str(root)}))
    with caplog.at_level(logging.ERROR):
        assert shard.main(["--params", str(path)]) == 1
    assert "train-images-idx3-ubyte.gz: Fashion-MNIST file not found" in caplog.text
    assert not (tmp_path / "data/shards/digits").exists()
