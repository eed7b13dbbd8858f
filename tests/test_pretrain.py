"""Pretraining: exact resume after kill -9, non-finite loss, learning on a tiny run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_config import tiny_params, write_params
from stages import pretrain
from stages.dino.training_state import LATEST
from stages.params import validate_params

ROOT = Path(__file__).resolve().parents[1]


def params_at(root: Path, shards: Path, **pretrain_overrides) -> dict:
    params = tiny_params(root, pretrain={"checkpoint_every_steps": 2, "log_every_steps": 1, **pretrain_overrides})
    params["paths"]["shards"] = str(shards)
    return params


def start(params_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain", "--params", str(params_file)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def final_teacher(root: Path) -> dict:
    state = torch.load(root / "checkpoints" / LATEST, weights_only=False)
    assert state["global_step"] == 18
    return state["teacher"]


def wait_for_step(checkpoint_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        latest = checkpoint_dir / LATEST
        if latest.exists():
            try:
                if torch.load(latest, weights_only=False)["global_step"] >= step:
                    return
            except Exception:  # being renamed into place
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


@pytest.mark.faults
def test_resume_after_kill_is_bitwise_exact(tmp_path, shards):
    reference_root = tmp_path / "uninterrupted"
    pretrain.run(validate_params(params_at(reference_root, shards)))
    expected = final_teacher(reference_root)

    # Kill -9 right after the checkpoint of step 4, and mid-epoch 2 after step 12's, resuming
    # each time with a data-loader worker (a run-only setting) to show workers change nothing.
    root = tmp_path / "killed"
    params_file = write_params(tmp_path / "params.yaml", params_at(root, shards))
    for step in (4, 12):
        proc = start(params_file)
        wait_for_step(root / "checkpoints", step, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    write_params(params_file, params_at(root, shards, num_workers=1))
    proc = start(params_file)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "resumed from" in output
    got = final_teacher(root)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.faults
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, shards):
    params_file = write_params(tmp_path / "params.yaml", params_at(tmp_path, shards, inject_nonfinite_at_step=5))
    proc = start(params_file)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output
    checkpoint = tmp_path / "checkpoints" / LATEST
    assert "non-finite loss (nan) at step 5 (epoch 0)" in output
    assert str(checkpoint) in output
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4
    assert not Path(tiny_params(tmp_path)["paths"]["teacher_backbone"]).exists()


def test_changed_params_start_from_scratch(tmp_path, shards, caplog):
    params = params_at(tmp_path, shards, epochs=1)
    pretrain.run(validate_params(params))
    params["pretrain"]["lr"] = 0.001
    with caplog.at_level("WARNING"):
        metrics = pretrain.run(validate_params(params))
    assert "other params (pretrain.lr)" in caplog.text
    assert metrics["steps"] == 9


def test_completed_run_is_not_repeated(tmp_path, shards, caplog):
    params = validate_params(params_at(tmp_path, shards, epochs=1))
    first = pretrain.run(params)
    with caplog.at_level("INFO"):
        metrics = pretrain.run(params)
    assert "resumed from" in caplog.text and metrics["steps"] == 9
    assert metrics == first and metrics["images_per_second"] > 0 and "teacher_entropy" in metrics
    exported = torch.load(params.paths.teacher_backbone, weights_only=False)
    assert set(exported) >= {"teacher_backbone", "model"}


def test_cpu_processes_start_themselves_with_torchrun(tmp_path, shards):
    """`cpu_processes: 2` on a plain `python -m stages.pretrain`: two ranks (gloo) train with the
    global batch of two processes; the result resumes and exports like a one-process run."""
    params = params_at(tmp_path, shards, cpu_processes=2, batch_size_per_gpu=16)
    params_file = write_params(tmp_path / "params.yaml", params)
    proc = start(params_file)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "starting 2 CPU processes with 1 thread(s) each" in out
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["steps"] == 18  # as one process with batch 32: 2 epochs of 300 // 32 steps
    assert (tmp_path / "models" / "teacher_backbone.pth").exists()


def test_decode_only_samples_skip_the_per_sample_seed(shards):
    from stages.dino.data import ShardImages, decode_uint8

    seeded = ShardImages(shards, "train", decode_uint8)
    plain = ShardImages(shards, "train", decode_uint8, random_transform=False)
    for index in (0, 7, len(plain) - 1):
        (a, label_a), (b, label_b) = seeded[(0, index)], plain[(0, index)]
        assert torch.equal(a, b) and label_a == label_b
    drawing = ShardImages(shards, "train", lambda data: torch.rand(3))
    assert torch.equal(drawing[(1, 4)][0], drawing[(1, 4)][0])  # a random transform stays seeded
    assert not torch.equal(drawing[(1, 4)][0], drawing[(2, 4)][0])


@pytest.mark.parametrize("key,size", [("global_crops_size", 18), ("local_crops_size", 6)])
def test_a_crop_size_the_patches_do_not_divide_is_refused_before_any_work(tmp_path, key, size):
    from stages.cli import StageError

    params = validate_params(params_at(tmp_path, tmp_path / "no-shards-read", **{key: size}))
    with pytest.raises(StageError, match=f"pretrain.{key} = {size} is not a multiple of model.patch_size = 4"):
        pretrain.run(params)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path, shards):
    from stages.cli import StageError

    params = validate_params(params_at(tmp_path, shards, epochs=1))
    pretrain.run(params)
    checkpoint = tmp_path / "checkpoints" / LATEST
    state = torch.load(checkpoint, weights_only=False)
    assert state["world_size"] == 1
    state["world_size"] = 4
    torch.save(state, checkpoint)
    with pytest.raises(StageError, match="written by 4 training processes, this run has 1: resume with 4"):
        pretrain.run(params)
