"""Fault 8: the disk fills up while a stage writes its output.

A 64 KiB tmpfs, mostly filled by a ballast file, stands in for a full scratch file system. The
write fails with ENOSPC naming the output path (stages.atomic re-raises the OS error with it);
the output path keeps its old content or stays absent; no temporary file or folder is left
behind. Needs `mount` (root, as in CI); skipped with the reason otherwise."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from faultkit import fault_params
from stages import extract
from stages.atomic import torch_save, write_json
from stages.dino.async_saver import AsyncCheckpointSaver
from stages.dino.backbones import build_backbone_from_params
from stages.dino.training_state import LATEST, PREVIOUS, load_latest, save_checkpoint
from stages.params import validate_params
from tiny_config import write_params

pytestmark = pytest.mark.faults

DISK_KB = 64
FREE_KB = 8  # what the ballast leaves free


@pytest.fixture
def full_disk(tmp_path: Path):
    """A nearly full 64 KiB tmpfs at tmp_path/disk, unmounted afterwards."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        (mountpoint / "ballast").write_bytes(b"\0" * ((DISK_KB - FREE_KB) * 1024))
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>" for p in directory.rglob("*")}


def test_extract_on_a_full_disk_fails_naming_the_output(tmp_path: Path, full_disk: Path, fault_shards: Path) -> None:
    params = fault_params(tmp_path / "run", fault_shards)
    params["paths"]["features"] = str(full_disk / "features/digits")
    teacher = Path(params["paths"]["teacher_backbone"])
    validated = validate_params(params)
    torch_save({"teacher_backbone": build_backbone_from_params(validated.model, drop_path_rate=0.0).state_dict(),
                "model": validated.model.model_dump(mode="json")}, teacher)
    before = contents(full_disk)
    with pytest.raises(OSError) as failed:
        extract.main(["--params", str(write_params(tmp_path / "params.yaml", params))])
    assert failed.value.errno == errno.ENOSPC, failed.value
    # named at its final place, not at a hidden temporary path
    assert failed.value.filename.startswith(f"{full_disk}/features/digits/"), failed.value
    assert "No space left on device" in str(failed.value)
    # nothing but the (empty) parent folder that the stage created: no partial output, no temp
    assert contents(full_disk) in (before, {**before, "features": b"<dir>"})


def test_full_disk_keeps_the_old_metrics(full_disk: Path) -> None:
    metrics = full_disk / "metrics/knn.json"
    write_json(metrics, {"top1_k20": 90.0})
    before = contents(full_disk)
    with pytest.raises(OSError) as failed:
        write_json(metrics, {f"top1_k{k}": float(k) for k in range(2000)})  # ~40 KB
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(metrics)
    assert contents(full_disk) == before
    assert json.loads(metrics.read_text()) == {"top1_k20": 90.0}


def test_full_disk_during_a_checkpoint_keeps_the_last_one(full_disk: Path) -> None:
    directory = full_disk / "checkpoints"
    save_checkpoint(directory, {"global_step": 2, "weights": torch.zeros(100)})
    with pytest.raises(OSError) as failed:
        save_checkpoint(directory, {"global_step": 4, "weights": torch.zeros(4096)})  # 16 KB
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(directory / LATEST)
    state, path = load_latest(directory)
    assert path == directory / LATEST and state["global_step"] == 2
    assert torch.load(directory / PREVIOUS, weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in directory.iterdir()) == sorted([LATEST, PREVIOUS])
    np.testing.assert_array_equal(state["weights"].numpy(), np.zeros(100))


def test_full_disk_during_an_async_checkpoint_surfaces_at_the_next_save(full_disk: Path) -> None:
    """The background write fails; the training thread gets the same ENOSPC naming checkpoint.pth
    at its next save, and the last complete checkpoint is kept."""
    directory = full_disk / "checkpoints"
    saver = AsyncCheckpointSaver(directory)
    saver.save({"global_step": 2, "weights": torch.zeros(100)})
    assert saver.wait() == directory / LATEST
    saver.save({"global_step": 4, "weights": torch.zeros(4096)})  # 16 KB: returns, fails behind
    with pytest.raises(OSError) as failed:
        saver.save({"global_step": 6, "weights": torch.zeros(100)})
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(directory / LATEST)
    state, path = load_latest(directory)
    assert path == directory / LATEST and state["global_step"] == 2
    assert sorted(p.name for p in directory.iterdir()) == sorted([LATEST, PREVIOUS])
