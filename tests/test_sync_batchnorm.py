"""stages.dino.sync_batchnorm: on two real gloo ranks, BatchNorm over each rank's rows equals
nn.BatchNorm on the whole batch in one process (outputs, gradients, running statistics); alone or
in eval mode it is nn.BatchNorm; the converter keeps the state dict; and a 2-rank CPU pretraining
with BN in the head keeps every rank's teacher identical, running statistics included."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny_config import tiny_params, write_params
from stages import shard
from stages.pretrain import build_models
from stages.dino.sync_batchnorm import DistributedBatchNorm, convert_distributed_batchnorm, has_batchnorm
from stages.dino.training_state import LATEST
from stages.params import validate_params

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests/sync_batchnorm_worker.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ATOL = RTOL = 1e-6  # float32 rounding of torch's BN; the inputs' means are ~20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(mode: str, directory: Path, timeout: float) -> list[dict]:
    """Both ranks of the worker with torchrun's variables; returns what each saved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(directory)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]


def bn_case(kind: str, kwargs: dict, shape: tuple[int, ...], split: int, seed: int) -> dict:
    """A BatchNorm with non-trivial parameters and running statistics, two training batches (mean
    far from 0, so the one-pass variance is tested) with output gradients, and rank 0's rows
    [0, split), rank 1's [split, N)."""
    gen = torch.Generator().manual_seed(seed)
    module = getattr(nn, kind)(**kwargs)
    state = module.state_dict()
    for key in ("weight", "bias", "running_mean"):
        if key in state:
            state[key] = torch.randn(state[key].shape, generator=gen)
    if "running_var" in state:
        state["running_var"] = torch.rand(state["running_var"].shape, generator=gen) + 0.5
    channels = shape[1]
    center = 20 * torch.randn([1, channels] + [1] * (len(shape) - 2), generator=gen)
    return {
        "kind": kind, "kwargs": kwargs, "state": state, "rows": [(0, split), (split, shape[0])],
        "inputs": [center + 3 * torch.randn(shape, generator=gen) for _ in range(2)],
        "output_grads": [torch.randn(shape, generator=gen) for _ in range(2)],
    }


CASES = {
    "bn1d": bn_case("BatchNorm1d", {"num_features": 4}, (8, 4), split=5, seed=0),
    "bn1d_no_affine_cumulative": bn_case("BatchNorm1d", {"num_features": 4, "affine": False, "momentum": None},
                                         (8, 4), split=5, seed=1),
    "bn2d": bn_case("BatchNorm2d", {"num_features": 3, "momentum": 0.3}, (5, 3, 2, 3), split=2, seed=2),
}


def reference(case: dict) -> tuple[nn.Module, list[dict]]:
    """nn.BatchNorm on the whole batch, one process."""
    bn = getattr(nn, case["kind"])(**case["kwargs"])
    bn.load_state_dict(case["state"])
    steps = []
    for x, g in zip(case["inputs"], case["output_grads"]):
        x = x.clone().requires_grad_(True)
        bn.zero_grad()
        out = bn(x)
        (out * g).sum().backward()
        steps.append({"out": out.detach(), "input_grad": x.grad,
                      **{f"{k}_grad": p.grad.clone() for k, p in bn.named_parameters()}})
    return bn, steps


@pytest.mark.timeout(400)
def test_two_ranks_equal_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    torch.save(CASES, tmp_path / "cases.pt")
    ranks = run_two_ranks("bn", tmp_path, timeout=300)
    for name, case in CASES.items():
        bn, expected_steps = reference(case)
        for step, expected in enumerate(expected_steps):
            got = [r[name]["steps"][step] for r in ranks]
            assert set(got[0]) == set(expected), name
            for key in ("out", "input_grad"):  # the ranks' rows, in order, are the whole batch's
                torch.testing.assert_close(torch.cat([g[key] for g in got]), expected[key],
                                           atol=ATOL, rtol=RTOL, msg=f"{name} step {step} {key}")
            for key in expected.keys() - {"out", "input_grad"}:  # DDP sums (averages) these over ranks
                torch.testing.assert_close(got[0][key] + got[1][key], expected[key], atol=ATOL, rtol=RTOL,
                                           msg=f"{name} step {step} {key}")
        for r, seen in enumerate(ranks):
            assert seen[name]["state"].keys() == bn.state_dict().keys()
            for key, value in bn.state_dict().items():
                torch.testing.assert_close(seen[name]["state"][key], value, atol=ATOL, rtol=RTOL,
                                           msg=f"{name} rank {r} {key}")
        bn.eval()
        rows = [slice(*rows) for rows in case["rows"]]
        eval_expected = bn(case["inputs"][0]).detach()
        for r, seen in enumerate(ranks):  # running statistics, per rank: exactly nn.BatchNorm
            torch.testing.assert_close(seen[name]["eval_out"], eval_expected[rows[r]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_process_is_batchnorm(name: str) -> None:
    """No process group: training and eval as nn.BatchNorm, bit for bit (the same kernel)."""
    assert not torch.distributed.is_initialized()
    case = CASES[name]
    bn, expected_steps = reference(case)
    ours = convert_distributed_batchnorm(getattr(nn, case["kind"])(**case["kwargs"]))
    ours.load_state_dict(case["state"])
    assert isinstance(ours, DistributedBatchNorm)
    for (x, g), expected in zip(zip(case["inputs"], case["output_grads"]), expected_steps):
        x = x.clone().requires_grad_(True)
        ours.zero_grad()
        out = ours(x)
        (out * g).sum().backward()
        assert torch.equal(out, expected["out"]) and torch.equal(x.grad, expected["input_grad"])
    for key, value in bn.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    bn.eval()
    ours.eval()
    assert torch.equal(ours(case["inputs"][1]), bn(case["inputs"][1]))


def test_converter_keeps_state_dict_and_loads_into_plain_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(2, affine=False)))
    model[:2](torch.randn(6, 3))  # non-default running statistics for the 1d BN
    model[1].weight.data.uniform_()
    model[2][0].eval()
    before = copy.deepcopy(model.state_dict())
    assert has_batchnorm(model) and not has_batchnorm(nn.Linear(2, 2))

    converted = convert_distributed_batchnorm(model)
    assert converted is model
    assert isinstance(model[1], DistributedBatchNorm) and isinstance(model[2][0], DistributedBatchNorm)
    assert model[1].training and not model[2][0].training and not model[2][0].affine
    after = model.state_dict()
    assert list(after) == list(before) and after._metadata == before._metadata  # BN's version, read on load
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(2, affine=False)))
    plain.load_state_dict(after)  # strict: teacher files and checkpoints stay readable by plain BN
    first = model[1]
    assert convert_distributed_batchnorm(model) is model and model[1] is first  # idempotent


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    shard.run(validate_params(tiny_params(root, dataset={"subset": {"train": 48, "val": 16}})))
    return root / "data/shards/digits"


@pytest.mark.timeout(600)  # generous: ~1 min, but the 2 cores are shared by parallel suites
def test_two_rank_cpu_pretraining_syncs_the_heads_batchnorm(tmp_path: Path, small_shards: Path) -> None:
    """Per-rank BN would leave each rank's teacher head with running statistics of its own half
    batch (the teacher is not DDP-wrapped, its buffers are its own); synced BN keeps them equal."""
    params = tiny_params(tmp_path, pretrain={"epochs": 1, "batch_size_per_gpu": 8, "use_bn_in_head": True})
    params["paths"]["shards"] = str(small_shards)
    write_params(tmp_path / "params.yaml", params)
    ranks = run_two_ranks("pretrain", tmp_path, timeout=500)
    assert [r["steps"] for r in ranks] == [3, 3]  # 48 images // (8 x 2 ranks)
    assert ranks[0]["teacher_norms"] == ranks[0]["student_norms"] == ["DistributedBatchNorm"]
    teachers = [r["teacher"] for r in ranks]
    tracked = [k for k in teachers[0] if k.startswith("head.") and k.endswith("num_batches_tracked")]
    assert tracked and all(int(teachers[0][k]) == 3 for k in tracked)  # the teacher's BN ran in train mode
    for key in teachers[0]:
        assert torch.equal(teachers[0][key], teachers[1][key]), key
    assert all(r["resumed"] for r in ranks)
    for key in teachers[0]:
        assert all(torch.equal(r["resumed_teacher"][key], teachers[0][key]) for r in ranks), key

    # The checkpoint (written by rank 0) loads, strictly, into the plain-BatchNorm models.
    checkpoint = torch.load(tmp_path / "checkpoints" / LATEST, weights_only=False)
    student, teacher = build_models(validate_params(params))
    student.load_state_dict(checkpoint["student"])
    teacher.load_state_dict(checkpoint["teacher"])
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teachers[0][key]), key
