"""Fault 3: a crash while a checkpoint or an output is being written.

(a) Killed between writing the temporary checkpoint and renaming it (a `.checkpoint.pth.*.tmp`
    left behind) with a truncated `checkpoint.pth`: the resume names the bad file, uses
    `checkpoint.prev.pth` and ends bitwise equal to an uninterrupted run.
(b) An output write that fails or is killed half-way: the final path keeps its old content (or
    stays absent); no partial file or folder takes its place.
tests/test_training_state.py covers load_latest's fallback as a unit."""

from __future__ import annotations

import io
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from faultkit import REPO, TOTAL_STEPS, assert_same_teacher, fault_params, stage_env
from stages import pretrain
from stages.atomic import atomic_dir, atomic_file, torch_save, write_json
from stages.dino.training_state import LATEST, PREVIOUS
from stages.features import read_features, write_features
from stages.params import validate_params

pytestmark = pytest.mark.faults


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_after_truncation(tmp_path_factory, fault_shards: Path, reference_run: Path) -> tuple[Path, str, dict]:
    """The reference's checkpoints as a kill -9 inside save_checkpoint leaves them (a
    half-written temp file beside a latest that the storage layer truncated), then a rerun.
    Returns (run root, the rerun's log, its metrics)."""
    root = tmp_path_factory.mktemp("truncated") / "run"
    shutil.copytree(reference_run / "checkpoints", root / "checkpoints")
    checkpoints = root / "checkpoints"
    latest_bytes = (checkpoints / LATEST).read_bytes()
    (checkpoints / f".{LATEST}.abc123.tmp").write_bytes(latest_bytes[: len(latest_bytes) // 3])
    (checkpoints / LATEST).write_bytes(latest_bytes[: len(latest_bytes) // 2])
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        metrics = pretrain.run(validate_params(fault_params(root, fault_shards)))
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)
    return root, log.getvalue(), metrics


def test_truncated_latest_and_stray_temp_resume_from_previous(resumed_after_truncation, reference_teacher) -> None:
    root, log, metrics = resumed_after_truncation
    checkpoints = root / "checkpoints"
    assert f"checkpoint {checkpoints / LATEST} is unreadable" in log
    assert f"resumed from {checkpoints / PREVIOUS} at epoch 1, step {TOTAL_STEPS - 2}" in log
    assert metrics["steps"] == TOTAL_STEPS
    assert_same_teacher(root, reference_teacher)


def test_after_a_fallback_resume_the_previous_checkpoint_is_valid_again(resumed_after_truncation) -> None:
    root, _, _ = resumed_after_truncation
    state = torch.load(root / "checkpoints" / PREVIOUS, weights_only=False)
    assert state["global_step"] == TOTAL_STEPS - 2


def test_failed_writes_keep_the_old_output(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics/knn.json"
    write_json(metrics, {"top1_k20": 50.0})
    old = metrics.read_bytes()
    with pytest.raises(TypeError):  # not JSON: fails half-way through json.dump
        write_json(metrics, {"top1_k20": 60.0, "bad": object()})
    with pytest.raises(Crash):
        with atomic_file(metrics, "w") as handle:
            handle.write('{"top1_k20": 7')
            raise Crash
    assert metrics.read_bytes() == old
    checkpoint = tmp_path / "checkpoints/checkpoint.pth"
    torch_save({"global_step": 1}, checkpoint)
    with pytest.raises(Exception):
        torch_save({"global_step": 2, "bad": lambda: None}, checkpoint)  # pickling fails mid-file
    assert torch.load(checkpoint, weights_only=False) == {"global_step": 1}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint.pth", "checkpoints", "knn.json", "metrics"]


def test_failed_features_write_keeps_the_old_folder(tmp_path: Path) -> None:
    directory = tmp_path / "features/digits/train"
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(6, 4)).astype(np.float32), np.arange(6)
    keys = [f"train_{i}" for i in range(6)]
    write_features(directory, feats, labels, keys, {"checkpoint_sha256": "a" * 64})
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    # The new features.npy/labels.npy/keys.txt are written, then meta.json fails.
    with pytest.raises(TypeError):
        write_features(directory, feats + 1, labels, keys, {"checkpoint_sha256": object()})
    with pytest.raises(Crash):
        with atomic_dir(directory) as tmp:
            (tmp / "features.npy").write_bytes(b"partial")
            raise Crash
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    np.testing.assert_array_equal(read_features(directory)[0], feats)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["train"]  # no temp folders left


KILLED_WRITER = """
import sys, time
from stages.atomic import atomic_file
with atomic_file(sys.argv[1], "wb") as handle:
    handle.write(b"new" * 100_000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_kill_9_during_an_output_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "features.npy"
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, env=stage_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"old"
    # Only a hidden temp file is left: no reader or DVC output path takes it for a result.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".features.npy.") and leftovers[0].endswith(".tmp")
