"""Fault 10: a data-loader worker of pretrain dies (SIGKILL, as the kernel's OOM killer does)
-> the run fails within seconds with torch's error naming the worker, exit status non-zero;
the last checkpoint stays valid."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from faultkit import Stage, fault_params
from stages.dino.training_state import LATEST
from tiny_config import write_params

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

FAIL_FAST_S = 30  # torch's SIGCHLD handler reacts at once; its queue timeout would be 5 s


def test_killed_loader_worker_fails_the_run_fast(tmp_path: Path, fault_shards: Path) -> None:
    root = tmp_path / "run"
    # Batches of 4: 16 per epoch, so at step 2 the worker (2 batches ahead at most) still has
    # most of epoch 0 to load; with 4 per epoch a fast machine could finish the epoch (and its
    # worker) before the kill lands.
    params = fault_params(root, fault_shards, num_workers=1, batch_size_per_gpu=4)
    params_file = write_params(tmp_path / "params.yaml", params)
    stage = Stage("pretrain", params_file)
    try:
        stage.wait_for("checkpoint at step 2 ->")  # mid epoch 0: its worker still has batches to load
        workers = stage.workers()
        assert len(workers) == 1, workers
        worker = workers[0]
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = stage.finish(FAIL_FAST_S + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        if stage.proc.poll() is None:
            stage.kill_group()
    assert code not in (0, -signal.SIGKILL), stage.output
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f}s to fail"
    assert f"DataLoader worker (pid" in stage.output and str(worker.pid) in stage.output, stage.output
    state = torch.load(root / "checkpoints" / LATEST, weights_only=False)
    assert 2 <= state["global_step"] < 16
    assert not (root / "models/teacher_backbone.pth").exists()
