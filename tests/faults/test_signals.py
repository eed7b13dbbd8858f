"""Fault 2 outside SLURM: SIGTERM to pretrain, and SIGUSR1 to its whole process group (loader
worker included, as slurmstepd and torchrun deliver signals) -> training goes on to the next log
step (every step here), a checkpoint of that step is written, the process exits with 75 (EX_TEMPFAIL, which Snakemake's
retry and torchrun's restart treat as "run again"), and the rerun ends bitwise equal to an
uninterrupted run. The SLURM requeue path is tests/slurm/test_pretrain_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from faultkit import TOTAL_STEPS, Stage, assert_same_teacher, fault_params
from stages.dino.training_state import LATEST
from stages.preemption import EXIT_PREEMPTED
from tiny_config import write_params

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

GRACE_S = 60  # SLURM's --signal=USR1@<seconds> margin the exit must fit in (one tiny step + save)


def preempt(stage: Stage, after_step: int, signum: int, whole_group: bool) -> int:
    """Signal once the checkpoint of `after_step` is logged; return the step it stopped at."""
    stage.wait_for(f"checkpoint at step {after_step} ->")
    sent = time.monotonic()
    if whole_group:
        os.killpg(stage.proc.pid, signum)
    else:
        os.kill(stage.proc.pid, signum)
    code = stage.finish(GRACE_S + 30)
    elapsed = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert code == EXIT_PREEMPTED, stage.output
    assert elapsed < GRACE_S, f"{name}: {elapsed:.1f}s to checkpoint and exit"
    assert f"{name} received: stopping at the next log step" in stage.output
    stopped = re.search(rf"stopped on {name}; checkpoint (\S+); exiting with {EXIT_PREEMPTED}", stage.output)
    assert stopped, stage.output
    assert "requeued SLURM job" not in stage.output and "scontrol" not in stage.output  # no SLURM job
    state = torch.load(stopped.group(1), weights_only=False)
    # The last step logged before the stop is the one the checkpoint holds: no step was lost.
    steps_logged = [int(s) for s in re.findall(r"checkpoint at step (\d+) ->", stage.output)]
    assert state["global_step"] == steps_logged[-1] > after_step - 1
    return state["global_step"]


def test_sigterm_and_sigusr1_checkpoint_exit_75_and_resume_exactly(
    tmp_path: Path, fault_shards: Path, reference_teacher
) -> None:
    root = tmp_path / "run"
    params_file = write_params(tmp_path / "params.yaml", fault_params(root, fault_shards))
    stages = []
    try:
        stages.append(Stage("pretrain", params_file))
        first = preempt(stages[-1], 2, signal.SIGTERM, whole_group=False)
        assert first <= TOTAL_STEPS - 3, f"stopped too late ({first}) to test a second signal"

        # Resume with a loader worker, and signal the whole group: the worker must survive it.
        write_params(params_file, fault_params(root, fault_shards, num_workers=1))
        stages.append(Stage("pretrain", params_file))
        stages[-1].wait_for(f"resumed from {root / 'checkpoints' / LATEST} at epoch")
        after = first + 2 - first % 2  # the next regular checkpoint (every 2 steps)
        second = preempt(stages[-1], after, signal.SIGUSR1, whole_group=True)
        assert first < second

        stages.append(Stage("pretrain", params_file))
        assert stages[-1].finish() == 0, stages[-1].output
        assert f"step {second}" in stages[-1].output
    finally:
        for stage in stages:
            if stage.proc.poll() is None:
                stage.kill_group()
    assert_same_teacher(root, reference_teacher)
