"""The `slurm_cluster` fixture: a real one-node SLURM cluster for the session (tests/slurm/cluster.sh).

Skips only when SLURM cannot be installed here (not root, or apt-get failed: cluster.sh exits 3),
and never in CI (``CI=true``): there a cluster that does not start fails the tests loudly. A cluster
that was already running before the session is used and left running; one this session started is
stopped at the end, whether the tests passed or not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
REPO = Path(__file__).resolve().parents[2]
EXIT_CANNOT_INSTALL = 3
START_TIMEOUT_S = 900  # a first start may run apt-get


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to submit jobs.

    Attributes:
        script: the cluster.sh that manages the cluster.
        partition: the default partition.
        env: environment for sbatch/srun: the repository on PYTHONPATH, SLURM_* of any enclosing job
            removed (so a test run inside a SLURM job does not leak its allocation into ours).
        python: the interpreter the jobs should use (this venv's).
    """

    script: Path
    partition: str
    env: dict[str, str]
    python: str


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout)


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the local cluster once per session; stop it at the end if this session started it."""
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run tests/slurm/cluster.sh")
    was_running = shutil.which("sinfo") is not None and _cluster("status", timeout=60).returncode == 0
    try:
        result = _cluster("start", timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CLUSTER_SH} start did not finish in {START_TIMEOUT_S}s")
    message = f"{CLUSTER_SH} start exited {result.returncode}:\n{result.stdout}{result.stderr}"
    if result.returncode == EXIT_CANNOT_INSTALL and not _in_ci():
        pytest.skip(f"SLURM cannot be installed here: {result.stderr.strip()}")
    if result.returncode != 0:
        pytest.fail(message + ("\n(CI=true: a SLURM cluster is required)" if _in_ci() else ""))
    partition = subprocess.run(
        ["timeout", "10", "sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=False
    ).stdout.split()
    try:
        yield SlurmCluster(CLUSTER_SH, partition[0].rstrip("*") if partition else "debug", job_env(), sys.executable)
    finally:
        if not was_running:
            stopped = _cluster("stop", timeout=120)
            if stopped.returncode != 0:
                sys.stderr.write(f"{CLUSTER_SH} stop exited {stopped.returncode}: {stopped.stderr}\n")
