"""Preemption: SIGTERM or SIGUSR1 (SLURM's `--signal=USR1@<seconds>`) asks the run to stop.

The training loop trains on to its next log step (`pretrain.log_every_steps`: reading the flag is a
collective, not made every step), writes a checkpoint and calls `leave`, which requeues
the SLURM job (`scontrol requeue $SLURM_JOB_ID`, when `pretrain.on_preempt` is "requeue" and the
process runs in a SLURM job) and exits with EXIT_PREEMPTED. The requeued job, or Snakemake's
retry, or a plain rerun, resumes from that checkpoint exactly.

All ranks must stop at the same step, or the survivors would wait forever in a collective: the
flag is combined over ranks (max) when it is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; Snakemake retries, torchrun restarts
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.local = False
        self.signal_name = ""

    def _on_signal(self, signum: int, _frame) -> None:
        self.local = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: stopping at the next log step", self.signal_name)

    @property
    def requested(self) -> bool:
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.local else 0.0])
            if torch_dist.get_backend() == "nccl":
                flag = flag.cuda()
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            if flag.item() > 0 and not self.local:
                self.local, self.signal_name = True, "signal on another rank"
        return self.local


@contextlib.contextmanager
def handler() -> Iterator[StopRequest]:
    """Install the stop handlers for the duration of training; restore the old ones after."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop._on_signal) for sig in SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def leave(signal_name: str, checkpoint: Path | None, requeue: bool = True) -> None:
    """Requeue the SLURM job if asked and possible, then exit with EXIT_PREEMPTED."""
    job = os.environ.get("SLURM_JOB_ID")
    rank0 = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0
    if requeue and job and rank0:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            logger.warning("requeued SLURM job %s", job)
        else:
            logger.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
    logger.warning("stopped on %s; checkpoint %s; exiting with %d", signal_name, checkpoint, EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)
