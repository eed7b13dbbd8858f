"""stages.distributed: launcher detection from (fake) environments, identity behaviour in one process,
and a real 2-process gloo group started with torchrun's variables."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import distributed as D
from stages.cli import StageError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests/slurm/dist_worker.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# The environment srun gave task 1 of `sbatch -n2` + `srun` on the local cluster (Slurm 22.05),
# with a multi-node host list substituted.
SRUN_TASK1 = {
    "SLURM_JOB_ID": "123457",
    "SLURM_JOB_NODELIST": "node[03-05,9],gpu1",
    "SLURM_NODELIST": "node[03-05,9],gpu1",
    "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
    "SLURM_LOCALID": "1",
    "SLURM_NPROCS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
}
# ... and what the batch script itself saw (no step variables).
SBATCH_SCRIPT = {
    "SLURM_JOB_ID": "123457",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_LOCALID": "0",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variables (the tests may themselves run inside a SLURM job or under torchrun)."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in LAUNCH_VARS:
            monkeypatch.delenv(key)


# ---------------------------------------------------------------------------------------------------
# one process, no process group


def test_single_process_init_and_identity_helpers(clean_env: None) -> None:
    assert not torch.distributed.is_initialized()
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.is_main and not info.initialized and info.launcher == "single" and info.backend is None
    assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)

    x = torch.randn(5, 3, requires_grad=True)
    mean = D.all_reduce_mean(x)
    assert torch.equal(mean, x.detach()) and mean.data_ptr() != x.data_ptr() and not mean.requires_grad
    gathered = D.all_gather_cat(x)
    assert torch.equal(gathered, x.detach()) and gathered.data_ptr() != x.data_ptr()
    empty = D.all_gather_cat(torch.zeros(0, 4))
    assert empty.shape == (0, 4)
    D.barrier()
    D.cleanup()
    assert not torch.distributed.is_initialized()


def test_helpers_refuse_bad_input() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        D.all_reduce_mean(torch.arange(3))
    with pytest.raises(ValueError, match="scalar"):
        D.all_gather_cat(torch.tensor(1.0))


def test_single_task_srun_and_sbatch_make_no_group(clean_env: None, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A 1-task step and a batch script without srun: world 1, nothing initialised."""
    for key, value in {**SRUN_TASK1, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    info = D.init_distributed()
    assert (info.launcher, info.world_size, info.initialized) == ("slurm", 1, False)
    assert "MASTER_PORT" not in os.environ  # nothing to rendezvous

    for key in SRUN_TASK1:
        monkeypatch.delenv(key)
    for key, value in SBATCH_SCRIPT.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING, logger="stages.distributed"):
        info = D.init_distributed()
    assert (info.launcher, info.rank, info.world_size, info.initialized) == ("single", 0, 1, False)
    assert "not started by srun" in caplog.text and "2 tasks" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of nccl")
def test_nccl_without_cuda_is_refused(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(D.LaunchError, match="nccl needs CUDA"):
        D.init_distributed(backend="nccl")
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------------
# launcher detection (unit level, fake environments)


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    assert D.detect_launcher(env) == D.LaunchEnv("torchrun", 3, 8, 1, "10.1.2.3", 29400)
    # torchrun wins over SLURM (srun ... torchrun, or torchrun inside an sbatch script).
    assert D.detect_launcher({**SRUN_TASK1, **env}).launcher == "torchrun"
    # LOCAL_RANK defaults to RANK, address and port to torchrun's defaults.
    assert D.detect_launcher({"RANK": "1", "WORLD_SIZE": "2"}) == D.LaunchEnv("torchrun", 1, 2, 1, "127.0.0.1", 29500)
    assert D.detect_launcher({"RANK": "0", "WORLD_SIZE": "1"}) == D.LaunchEnv("torchrun", 0, 1, 0, None, None)


def test_no_launcher_is_a_single_process() -> None:
    assert D.detect_launcher({}) == D.LaunchEnv("single", 0, 1, 0)
    assert D.detect_launcher({"WORLD_SIZE": "4"}) == D.LaunchEnv("single", 0, 1, 0)  # no RANK: not a launcher


def test_srun_variables_world_size_from_ntasks() -> None:
    launch = D.detect_launcher(SRUN_TASK1, use_scontrol=False)
    assert launch == D.LaunchEnv("slurm", rank=1, world_size=4, local_rank=1, master_addr="node03",
                                 master_port=10000 + 123457 % 20000)
    assert launch.master_port == 13457
    # SLURM_NTASKS missing: the step's task count.
    env = {k: v for k, v in SRUN_TASK1.items() if k != "SLURM_NTASKS"}
    assert D.detect_launcher(env, use_scontrol=False).world_size == 4


def test_srun_master_overrides_and_fallbacks() -> None:
    env = {**SRUN_TASK1, "MASTER_PORT": "23456", "MASTER_ADDR": "head"}
    launch = D.detect_launcher(env, use_scontrol=False)
    assert (launch.master_addr, launch.master_port) == ("head", 23456)
    # Without a node list: the launch node's address.
    env = {k: v for k, v in SRUN_TASK1.items() if "NODELIST" not in k}
    assert D.detect_launcher(env, use_scontrol=False).master_addr == "10.0.0.7"
    # An unparseable list falls back too; with no fallback it is an error naming the variable.
    env = {**SRUN_TASK1, "SLURM_JOB_NODELIST": "node[01-03"}
    assert D.detect_launcher(env, use_scontrol=False).master_addr == "10.0.0.7"
    del env["SLURM_LAUNCH_NODE_IPADDR"]
    with pytest.raises(D.LaunchError, match="SLURM_JOB_NODELIST"):
        D.detect_launcher(env, use_scontrol=False)


def test_srun_master_addr_from_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scontrol show hostnames comes first; when it fails the list is parsed here."""
    fake = tmp_path / "bin/scontrol"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 9\necho "$3" > "$0.arg"\n'
                    'printf "from-scontrol\\nsecond\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert D.detect_launcher(SRUN_TASK1).master_addr == "from-scontrol"
    assert (tmp_path / "bin/scontrol.arg").read_text().strip() == SRUN_TASK1["SLURM_JOB_NODELIST"]
    fake.write_text("#!/bin/sh\necho 'scontrol: error: no config' >&2\nexit 1\n")
    assert D.detect_launcher(SRUN_TASK1).master_addr == "node03"


@pytest.mark.parametrize(
    ("env_update", "message"),
    [
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_PROCID": "4"}, r"rank 4 is outside \[0, 4\)"),
        ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is missing"),
        ({"SLURM_NTASKS": "0"}, "world size must be >= 1"),
    ],
)
def test_bad_slurm_variables_name_the_variable(env_update: dict, message: str) -> None:
    with pytest.raises(D.LaunchError, match=message):
        D.detect_launcher({**SRUN_TASK1, **env_update}, use_scontrol=False)


def test_bad_torchrun_variables_name_the_variable() -> None:
    with pytest.raises(D.LaunchError, match="WORLD_SIZE='two'"):
        D.detect_launcher({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(D.LaunchError, match=r"rank 2 is outside \[0, 2\)"):
        D.detect_launcher({"RANK": "2", "WORLD_SIZE": "2"})
    assert issubclass(D.LaunchError, StageError)  # a stage's command line exits 1 with the message


HOSTLISTS = [
    ("vm", "vm"),
    ("node[01-03]", "node01"),
    ("node[3-5,9],gpu1", "node3"),
    ("gpu1,node[1-2]", "gpu1"),
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("n[007]", "n007"),
    ("a-b,c", "a-b"),
]


@pytest.mark.parametrize(("nodelist", "first"), HOSTLISTS)
def test_first_host(nodelist: str, first: str) -> None:
    assert D.first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "node[01-03", "node01]", "a[1-2"])
def test_first_host_refuses_broken_lists(bad: str) -> None:
    with pytest.raises(D.LaunchError):
        D.first_host(bad)


@pytest.mark.skipif(not Path("/etc/slurm/slurm.conf").exists(), reason="scontrol needs a slurm.conf")
def test_first_host_agrees_with_scontrol() -> None:
    for nodelist, _ in HOSTLISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        assert D.first_host(nodelist) == out.stdout.split()[0]


# ---------------------------------------------------------------------------------------------------
# two real processes, torchrun-style variables, gloo


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_processes_torchrun_env(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
                PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=200)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)

    # Expected values built independently of the worker: plain loops over ranks.
    world = 2
    values = [float(r + 1) for r in range(world)]
    expected_mean = [sum(values) / world, sum(10 * v for v in values) / world]
    expected_gather = []
    for r in range(world):
        for i in range(r + 2):
            expected_gather.append([100 * r + 3 * i + j for j in range(3)])
    expected_empty_first = [[100 + 3 * i + j for j in range(3)] for i in range(3)]
    expected_labels = [10 * r + i for r in range(world) for i in range(r + 1)]
    for r in range(world):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (seen["rank"], seen["world_size"], seen["local_rank"]) == (r, world, r)
        assert (seen["get_rank"], seen["get_world_size"]) == (r, world)
        assert seen["is_main"] == seen["is_main_process"] == (r == 0)
        assert (seen["launcher"], seen["backend"], seen["initialized"], seen["device"]) == ("torchrun", "gloo", True, "cpu")
        assert seen["sum"] == [sum(values)] * 2
        assert seen["mean"] == pytest.approx(expected_mean)
        assert seen["gathered"] == expected_gather
        assert seen["gathered_empty_first"] == expected_empty_first
        assert seen["labels"] == expected_labels and seen["labels_dtype"] == "torch.int64"
        assert seen["initialized_after_cleanup"] is False
