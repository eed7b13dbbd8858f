"""Fault 1, third point: `kill -9` of pretrain while it waits on a data-loader worker.

tests/test_pretrain.py::test_resume_after_kill_is_bitwise_exact kills right after a checkpoint
and mid-epoch; here the kill lands just after an epoch's checkpoint, when the next epoch's
loader worker has been started and the main process waits for its first batch."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from faultkit import STEPS_PER_EPOCH, Stage, assert_same_teacher, fault_params
from tiny_config import write_params

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


def test_kill_during_data_loading_resumes_bitwise(tmp_path: Path, fault_shards: Path, reference_teacher) -> None:
    root = tmp_path / "run"
    params_file = write_params(tmp_path / "params.yaml", fault_params(root, fault_shards, num_workers=1))
    stage = Stage("pretrain", params_file)
    try:
        stage.wait_for("pretrain:")  # the training loop (and epoch 0's loader) is starting
        first: set[int] = set()
        deadline = time.monotonic() + 180
        killed_worker = None
        while time.monotonic() < deadline:
            assert stage.proc.poll() is None, stage.output
            pids = {w.pid for w in stage.workers()}
            done_epoch0 = f"checkpoint at step {STEPS_PER_EPOCH} ->" in stage.output
            if not first:
                first |= pids  # epoch 0's one worker
            # Epoch 0's checkpoint is on disk (logged by the background writer, maybe after epoch
            # 1's loader started) and epoch 1's worker is up: the main process is loading its batch.
            elif done_epoch0 and pids - first:
                killed_worker = next(iter(pids - first))
                os.kill(stage.proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert killed_worker is not None, f"never saw epoch 1's loader worker:\n{stage.output}"
        assert stage.finish(30) == -signal.SIGKILL
        assert f"checkpoint at step {STEPS_PER_EPOCH + 1} ->" not in stage.output
        assert first, "epoch 0 ran without a loader worker"
        # The orphaned worker notices its parent is gone (torch's watchdog) and exits by itself.
        try:
            psutil.Process(killed_worker).wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            psutil.Process(killed_worker).kill()
            pytest.fail(f"orphaned loader worker {killed_worker} still alive 30 s after its parent died")
    finally:
        if stage.proc.poll() is None:
            stage.kill_group()

    rerun = Stage("pretrain", params_file)
    try:
        assert rerun.finish() == 0, rerun.output
    finally:
        if rerun.proc.poll() is None:
            rerun.kill_group()
    assert f"at epoch 1, step {STEPS_PER_EPOCH}" in rerun.output  # resumed from epoch 0's checkpoint
    assert_same_teacher(root, reference_teacher)
