"""DINO pretraining on the local SLURM cluster: two ranks under a plain `srun` stay identical and
share one center; SIGUSR1 to a running job checkpoints, requeues and resumes exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_config import tiny_params, write_params
from stages import pretrain, shard
from stages.dino.training_state import LATEST
from stages.params import validate_params
from test_cluster import REPO, job_field, run_job, sbatch, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-shards")
    shard.run(validate_params(tiny_params(root)))
    return root / "data/shards/digits"


def params_for(root: Path, shards: Path, **pretrain_overrides) -> dict:
    params = tiny_params(root, pretrain={"batch_size_per_gpu": 16, **pretrain_overrides})
    params["paths"]["shards"] = str(shards)
    return params


def test_two_ranks_under_srun_stay_identical(slurm_cluster, tmp_path, shards):
    params_file = write_params(tmp_path / "params.yaml", params_for(tmp_path, shards))
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nset -e\n"
        f"srun '{slurm_cluster.python}' '{REPO}/tests/slurm/pretrain_worker.py' '{params_file}' '{tmp_path}/out' 4\n"
    )
    job_id, state = run_job(slurm_cluster, ["-n2", "-o", str(tmp_path / "job.out"), str(script)], timeout=300)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()
    ranks = [json.loads((tmp_path / f"out/rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 4
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0["student"] == step1["student"]  # DDP: same gradients, same update, bitwise
        assert step0["teacher"] == step1["teacher"]
        assert step0["center"] == step1["center"]
        np.testing.assert_allclose(step0["center"], step0["expected_center"], rtol=1e-5, atol=1e-6)
        # and it is not just this rank's own mean: the ranks saw different images
        assert not np.allclose(step0["center"], step0["local_mean_center"], rtol=1e-5, atol=1e-6)


def test_sigusr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path, shards):
    reference = tmp_path / "uninterrupted"
    pretrain.run(validate_params(params_for(reference, shards, epochs=3)))
    expected = torch.load(reference / "checkpoints" / LATEST, weights_only=False)

    root = tmp_path / "preempted"
    params_file = write_params(tmp_path / "params.yaml", params_for(root, shards, epochs=3, checkpoint_every_steps=1000))
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun '{slurm_cluster.python}' -m stages.pretrain --params '{params_file}'\n"
    )
    submitted = sbatch(slurm_cluster, ["--parsable", "--requeue", "-o", str(tmp_path / "job-%j-%r.out"),
                                       "--open-mode=append", str(script)])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = lambda: "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))  # noqa: E731
    try:
        # Wait until training is under way (first epoch's checkpoint written), then preempt.
        wait_for(lambda: (root / "checkpoints" / LATEST).exists(), 240, "the first checkpoint")
        signal = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True, timeout=30)
        assert signal.returncode == 0, signal.stderr
        wait_for(lambda: job_field(job_id, "Restarts") == "1", 120, f"the job to be requeued\n{log()}")
        wait_for(lambda: job_field(job_id, "JobState") == "COMPLETED", 300, f"the requeued job to finish\n{log()}")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    output = log()
    assert "SIGUSR1 received" in output and "requeued SLURM job" in output and "resumed from" in output, output
    got = torch.load(root / "checkpoints" / LATEST, weights_only=False)
    assert got["global_step"] == expected["global_step"]
    for key, value in expected["teacher"].items():
        assert torch.equal(got["teacher"][key], value), key
