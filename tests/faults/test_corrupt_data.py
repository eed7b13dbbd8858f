"""Fault 4: corrupt shards, end to end through the stages `pretrain` and `extract`.

Each case damages one training shard (a copy of the session's shards); most also rewrite the
manifest's size and sha256 so that it vouches for the damage, which is what a buggy or foreign
shard writer produces, and only the content checks stand between it and training. Every case must
end in exit status 1 with a message naming the shard file and, where one exists, the sample.
The reader's own unit tests are tests/test_shard_format.py; the counted skip of unreadable source
images under `dataset.max_bad_fraction` is tests/test_shard.py."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from faultkit import Stage, fault_params, replace_shard, tar_bytes, tar_members
from stages import extract, pretrain
from stages.atomic import torch_save
from stages.dino.backbones import build_backbone_from_params
from stages.params import validate_params
from tiny_config import write_params

pytestmark = pytest.mark.faults

SHARD = "train-000001.tar"  # the damaged shard: the second of the two training shards


def first_sample_of_training(shards: Path) -> str:
    """The key of the first image pretraining reads (epoch 0's permutation, as EpochBatches;
    the samples are indexed shard by shard in stored order)."""
    order = np.random.default_rng([0, 0]).permutation(64)  # pretrain.seed 0, epoch 0
    members = tar_members(shards / "train-000000.tar") + tar_members(shards / SHARD)
    keys = [name.split(".")[0] for name, _ in members if not name.endswith(".cls")]
    return keys[int(order[0])]


def damage(shards: Path, key: str | None, case: str) -> str | None:
    """Apply `case` to SHARD; return the sample key the error must name (None: only the shard)."""
    members = tar_members(shards / SHARD)
    keys = [name.split(".")[0] for name, _ in members if name.endswith(".cls")]
    key = key if key in keys else keys[5]
    if case == "truncated":  # cut short after the copy; the manifest still has the full size
        data = (shards / SHARD).read_bytes()
        replace_shard(shards, "train", 1, data[: len(data) // 2], update_manifest=False)
        return None
    if case == "truncated_vouched":  # cut inside a sample's data, the manifest matching the cut
        data = tar_bytes(members)
        offset = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:10]) + 700
        replace_shard(shards, "train", 1, data[:offset])
        return keys[5]
    if case == "sha256":  # one flipped byte inside an image: same size, other hash
        data = bytearray((shards / SHARD).read_bytes())
        data[512 + 100] ^= 0xFF
        replace_shard(shards, "train", 1, bytes(data), update_manifest=False)
        return None
    if case == "undecodable":
        members = [(n, b"\x89PNG\r\n\x1a\n not a png" if n == f"{key}.png" else d) for n, d in members]
        replace_shard(shards, "train", 1, tar_bytes(members))
        return key
    if case == "missing_cls":
        members = [(n, d) for n, d in members if n != f"{key}.cls"]
        replace_shard(shards, "train", 1, tar_bytes(members))
        return key
    if case == "class_out_of_range":  # digits has classes 0..9
        members = [(n, b"10" if n == f"{key}.cls" else d) for n, d in members]
        replace_shard(shards, "train", 1, tar_bytes(members))
        return key
    if case == "empty_tar":  # a valid tar with no member, the manifest still counting 32 samples
        replace_shard(shards, "train", 1, tar_bytes([]))
        return None
    if case == "empty_file":  # a zero-byte file the manifest vouches for
        replace_shard(shards, "train", 1, b"")
        return None
    raise ValueError(case)


CASES = ["truncated", "truncated_vouched", "sha256", "undecodable", "missing_cls", "class_out_of_range",
         "empty_tar", "empty_file"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A teacher backbone in pretrain's export format (random weights: extract needs a file)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_backbone.pth"
    params = validate_params(fault_params(path.parent))
    torch_save({"teacher_backbone": build_backbone_from_params(params.model, drop_path_rate=0.0).state_dict(),
                "model": params.model.model_dump(mode="json")}, path)
    return path


def damaged_params(tmp_path: Path, fault_shards: Path, case: str, **pretrain_overrides) -> tuple[dict, Path, str | None]:
    shards = tmp_path / "shards"
    shutil.copytree(fault_shards, shards)
    expected_key = damage(shards, first_sample_of_training(fault_shards), case)
    params = fault_params(tmp_path / "out", shards, **pretrain_overrides)
    return params, shards, expected_key


def check_message(message: str, shards: Path, key: str | None) -> None:
    assert str(shards / SHARD) in message, message
    if key is not None:
        assert re.search(rf"sample '{key}'", message), message


def run_main(main: Callable[[list[str]], int], params_file: Path, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(["--params", str(params_file)])
    failures = [r.getMessage() for r in caplog.records if r.name == "stages.cli"]
    return code, "\n".join(failures)


PRETRAIN_XFAIL: dict[str, str] = {}


def xfail_cases(known: dict[str, str]) -> list:
    return [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=known[c])) if c in known else c
            for c in CASES]


@pytest.mark.parametrize("case", xfail_cases(PRETRAIN_XFAIL))
def test_pretrain_refuses_damaged_shards(tmp_path: Path, fault_shards: Path, case: str, caplog) -> None:
    params, shards, key = damaged_params(tmp_path, fault_shards, case)
    code, message = run_main(pretrain.main, write_params(tmp_path / "params.yaml", params), caplog)
    assert code == 1, message
    check_message(message, shards, key)
    assert not Path(params["paths"]["teacher_backbone"]).exists()


EXTRACT_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("case", xfail_cases(EXTRACT_XFAIL))
def test_extract_refuses_damaged_shards(tmp_path: Path, fault_shards: Path, teacher_file: Path, case: str,
                                        caplog) -> None:
    params, shards, key = damaged_params(tmp_path, fault_shards, case)
    params["paths"]["teacher_backbone"] = str(teacher_file)
    code, message = run_main(extract.main, write_params(tmp_path / "params.yaml", params), caplog)
    assert code == 1, message
    check_message(message, shards, key)
    assert not Path(params["paths"]["features"]).exists()


def test_worker_error_reaches_the_command_line(tmp_path: Path, fault_shards: Path) -> None:
    """`python -m stages.pretrain` with a loader worker: the worker's ShardError for an
    undecodable image ends the process with status 1, the shard and sample named."""
    params, shards, key = damaged_params(tmp_path, fault_shards, "undecodable", num_workers=1)
    stage = Stage("pretrain", write_params(tmp_path / "params.yaml", params))
    try:
        code = stage.finish()
    finally:
        if stage.proc.poll() is None:
            stage.kill_group()
    assert code == 1, stage.output
    assert "stage pretrain failed: Caught ShardError in DataLoader worker process 0" in stage.output
    # torch appends the worker's traceback; its last line is our ShardError's message
    check_message(stage.output.split("stage pretrain failed")[1], shards, key)
    assert not Path(params["paths"]["teacher_backbone"]).exists()
