"""The local SLURM cluster works the way the pipeline uses SLURM: batch jobs, a 2-task srun that
initialises torch.distributed through `stages.distributed.init_distributed`, and requeue (what
preemption does to a running pretraining job)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from stages.distributed import detect_launcher

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests/slurm/dist_worker.py"


def sbatch(cluster, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", "-p", cluster.partition, *args],
        capture_output=True, text=True, timeout=timeout, env=cluster.env, cwd=REPO,
    )


def job_field(job_id: str, field: str) -> str:
    """One `Key=Value` field of `scontrol show job` ('' once the job record is gone)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    for item in out.split():
        key, _, value = item.partition("=")
        if key == field:
            return value
    return ""


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def run_job(cluster, args: list[str], timeout: float) -> tuple[str, str]:
    """Submit, then poll every 0.2 s until the job ends (sbatch --wait polls every 2-10 s).

    Returns:
        (job id, final JobState).
    """
    submitted = sbatch(cluster, ["--parsable", *args])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: job_field(job_id, "JobState") in TERMINAL, timeout, f"job {job_id} to end")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    return job_id, job_field(job_id, "JobState")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_sbatch_wait_runs_a_trivial_job(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    result = sbatch(slurm_cluster, ["--wait", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID on $(hostname -s)"])
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[-1]
    assert out.read_text().split()[:4] == ["hello", "from", job_id, "on"]
    failing = sbatch(slurm_cluster, ["--wait", "-o", str(tmp_path / "fail.out"), "--wrap", "exit 3"])
    assert failing.returncode == 3  # sbatch --wait returns the job's exit code


def test_srun_two_tasks_init_distributed(slurm_cluster, tmp_path: Path) -> None:
    """sbatch -n2: srun starts two ranks that rendezvous through init_distributed (gloo). The batch
    script's own environment (SLURM_NTASKS=2 but no step) must read as a single process: a script
    that forgets srun runs alone instead of waiting forever for a second rank."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nset -e\n"
        f"env -0 > '{tmp_path}/batch.env'\n"
        f"srun '{slurm_cluster.python}' '{WORKER}' '{tmp_path}/out' --backend gloo\n"
    )
    job_id, state = run_job(slurm_cluster, ["-n2", "-o", str(tmp_path / "job.out"), str(script)], timeout=150)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", log
    ranks = [json.loads((tmp_path / f"out/rank{r}.json").read_text()) for r in range(2)]

    world = 2
    expected_gather = [[100 * r + 3 * i + j for j in range(3)] for r in range(world) for i in range(r + 2)]
    expected_empty_first = [[100 * 1 + 3 * i + j for j in range(3)] for i in range(3)]
    expected_labels = [10 * r + i for r in range(world) for i in range(r + 1)]
    for r, seen in enumerate(ranks):
        assert seen["rank"] == r and seen["get_rank"] == r
        assert seen["world_size"] == world and seen["get_world_size"] == world
        assert seen["local_rank"] == r  # one node: local id == rank
        assert seen["launcher"] == "slurm" and seen["backend"] == "gloo" and seen["initialized"]
        assert seen["is_main"] == seen["is_main_process"] == (r == 0)
        assert seen["job_id"] == job_id
        assert seen["master_port"] == str(10000 + int(job_id) % 20000)
        assert seen["master_addr"] == subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        assert seen["sum"] == [3.0, 3.0]  # 1 + 2
        assert seen["mean"] == [1.5, 15.0]
        assert seen["gathered"] == expected_gather
        assert seen["gathered_empty_first"] == expected_empty_first
        assert seen["labels"] == expected_labels and seen["labels_dtype"] == "torch.int64"
        assert seen["initialized_after_cleanup"] is False

    batch_env = dict(item.split("=", 1) for item in (tmp_path / "batch.env").read_text().split("\0") if "=" in item)
    assert batch_env["SLURM_NTASKS"] == "2" and batch_env["SLURM_PROCID"] == "0"
    launch = detect_launcher(batch_env)
    assert (launch.launcher, launch.rank, launch.world_size) == ("single", 0, 1)


def test_scontrol_requeue_reruns_a_running_job(slurm_cluster, tmp_path: Path) -> None:
    """A requeued running job gets SIGTERM, goes back to the queue and runs again with
    SLURM_RESTART_COUNT incremented: what preemption with requeue does to pretraining."""
    runs = tmp_path / "runs.txt"
    script = tmp_path / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"echo \"start ${{SLURM_RESTART_COUNT:-0}}\" >> '{runs}'\n"
        f"trap 'echo term >> \"{runs}\"; exit 143' TERM\n"
        "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then sleep 120 & wait $!; fi\n"
        f"echo \"done ${{SLURM_RESTART_COUNT:-0}}\" >> '{runs}'\n"
    )
    result = sbatch(slurm_cluster, ["--parsable", "--requeue", "-o", str(tmp_path / "requeue.out"), str(script)])
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: runs.exists() and "start 0" in runs.read_text(), 60, "the first run to start")
        requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        assert requeue.returncode == 0, requeue.stderr
        wait_for(lambda: job_field(job_id, "JobState") == "COMPLETED", 90, "the requeued job to complete")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert runs.read_text().split("\n")[:-1] == ["start 0", "term", "start 1", "done 1"]
    assert job_field(job_id, "Restarts") == "1"
