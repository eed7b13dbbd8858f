"""Asynchronous checkpoints (stages.dino.async_saver): the file holds the state as it was at
`save()`, buffers are reused, a failed write surfaces on the training thread naming the file, and a
pretraining run with async checkpoints ends and resumes exactly like a synchronous one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from stages import pretrain, shard
from stages.dino import async_saver
from stages.dino.async_saver import AsyncCheckpointSaver
from stages.dino.training_state import LATEST, PREVIOUS, save_checkpoint
from stages.params import validate_params
from tiny_config import tiny_params


def live_state(step: int = 2) -> dict:
    """A nested state as Trainer.state() builds it: dicts, lists, tuples, tensors and plain values."""
    return {
        "global_step": step,
        "student": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)},
        "optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(4)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [(torch.ones(2, dtype=torch.uint8), "mt19937")],
        "history": [1.5],
    }


def test_the_file_holds_the_state_as_it_was_at_save(tmp_path: Path) -> None:
    release = threading.Event()

    def write_when_released(directory: Path, state: dict) -> Path:
        release.wait(10)  # the training thread updates its tensors before anything is written
        return save_checkpoint(directory, state)

    state = live_state()
    expected = {"w": state["student"]["w"].clone(), "exp_avg": state["optimizer"]["state"][0]["exp_avg"].clone()}
    saver = AsyncCheckpointSaver(tmp_path, write=write_when_released)
    saver.save(state)
    state["student"]["w"].add_(100)  # as the next optimizer step does, in place
    state["optimizer"]["state"][0]["exp_avg"].mul_(0)
    state["history"].append(9.0)
    release.set()
    assert saver.wait() == tmp_path / LATEST
    saved = torch.load(tmp_path / LATEST, weights_only=False)
    assert torch.equal(saved["student"]["w"], expected["w"])
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], expected["exp_avg"])
    assert saved["history"] == [1.5] and saved["global_step"] == 2
    assert saved["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert isinstance(saved["rng"][0], tuple) and saved["rng"][0][1] == "mt19937"


def test_module_state_dicts_keep_their_type_and_metadata(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    saver = AsyncCheckpointSaver(tmp_path)
    saver.save({"global_step": 1, "model": module.state_dict()})
    saved = torch.load(saver.wait(), weights_only=False)["model"]
    assert type(saved) is type(module.state_dict())
    assert saved._metadata == module.state_dict()._metadata  # BatchNorm's version, read on load
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).load_state_dict(saved)


def test_buffers_are_reused_across_checkpoints(tmp_path: Path) -> None:
    snapshots = []

    def record(directory: Path, state: dict) -> Path:
        snapshots.append(state)
        return save_checkpoint(directory, state)

    saver = AsyncCheckpointSaver(tmp_path, write=record)
    state = live_state(2)
    saver.save(state)
    state["student"]["w"].add_(1)
    state["global_step"] = 4
    saver.save(state)
    state["student"]["b"] = torch.zeros(5)  # a new shape: that buffer alone is made anew
    saver.save(state)
    saver.wait()
    first, second, third = snapshots
    assert first["student"]["w"].data_ptr() == second["student"]["w"].data_ptr() == third["student"]["w"].data_ptr()
    assert first["optimizer"]["state"][0]["exp_avg"].data_ptr() == second["optimizer"]["state"][0]["exp_avg"].data_ptr()
    assert third["student"]["b"].shape == (5,)
    for snapshot in snapshots:  # never the live tensors themselves; pinned only where CUDA is
        assert snapshot["student"]["w"].data_ptr() != state["student"]["w"].data_ptr()
        assert snapshot["student"]["w"].is_pinned() == torch.cuda.is_available()
    assert torch.equal(torch.load(tmp_path / PREVIOUS, weights_only=False)["student"]["w"],
                       torch.arange(6.0).reshape(2, 3) + 1)


@pytest.mark.parametrize("surfaces_at", ["save", "wait"])
def test_a_failed_write_surfaces_at_the_next_save_or_wait_naming_the_path(tmp_path: Path, surfaces_at: str) -> None:
    (tmp_path / "not-a-folder").write_text("")
    directory = tmp_path / "not-a-folder" / "checkpoints"  # cannot be made (even as root)
    saver = AsyncCheckpointSaver(directory)
    saver.save(live_state())  # returns: the write fails in the background
    with pytest.raises(OSError, match=str(directory)):
        saver.save(live_state(4)) if surfaces_at == "save" else saver.wait()
    assert saver.wait() is None  # raised once; nothing was written


# -- the pretrain stage --------------------------------------------------------------------------

class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    shard.run(validate_params(params_at(root)))
    return root / "data/shards/digits"


def params_at(root: Path, shards: Path | None = None, **pretrain_overrides) -> dict:
    """64 digits, batch 16: 4 steps per epoch, 2 epochs, a checkpoint every 2 steps."""
    params = tiny_params(root, dataset={"subset": {"train": 64, "val": 32}, "shard_max_samples": 32},
                         pretrain={"batch_size_per_gpu": 16, "checkpoint_every_steps": 2, "log_every_steps": 1,
                                   **pretrain_overrides})
    if shards is not None:
        params["paths"]["shards"] = str(shards)
    return params


def test_a_crash_waits_for_the_checkpoint_in_flight_and_the_rerun_equals_a_synchronous_run(
    tmp_path: Path, shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synchronous = tmp_path / "sync"
    pretrain.run(validate_params(params_at(synchronous, shards, async_checkpoint=False)))
    expected = torch.load(synchronous / "checkpoints" / LATEST, weights_only=False)

    def slow_save_checkpoint(directory: Path, state: dict) -> Path:
        time.sleep(2.0)  # still writing when the crash comes
        return save_checkpoint(directory, state)

    def fit_noting_the_checkpoint_on_leaving(trainer: pretrain.Trainer, live=None) -> dict:
        try:
            return fit(trainer, live)
        finally:
            on_leaving.append(torch.load(root / "checkpoints" / LATEST, weights_only=False)["global_step"])

    def crash_after_step_4(trainer: pretrain.Trainer, views):
        if trainer.progress.global_step == 4:  # right after the checkpoint of step 4 was handed over
            raise Crash("step 5")
        return train_step(trainer, views)

    train_step, fit, on_leaving = pretrain.Trainer.train_step, pretrain.Trainer.fit, []
    root = tmp_path / "async"
    params = validate_params(params_at(root, shards))
    assert params.pretrain.async_checkpoint  # the default
    with monkeypatch.context() as patch:
        patch.setattr(async_saver, "save_checkpoint", slow_save_checkpoint)
        patch.setattr(pretrain.Trainer, "train_step", crash_after_step_4)
        patch.setattr(pretrain.Trainer, "fit", fit_noting_the_checkpoint_on_leaving)
        with pytest.raises(Crash):
            pretrain.run(params)
    assert on_leaving == [4]  # training left only once the checkpoint in flight was on disk
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [PREVIOUS, LATEST]

    assert pretrain.run(params)["steps"] == 8  # resumes from step 4
    got = torch.load(root / "checkpoints" / LATEST, weights_only=False)
    assert got["global_step"] == expected["global_step"] == 8
    assert got["history"] == expected["history"]
    for part in ("student", "teacher", "dino_loss"):
        for key, tensor in expected[part].items():
            assert torch.equal(got[part][key], tensor), f"{part}.{key}"
    for index, moments in expected["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(got["optimizer"]["state"][index][key], tensor), f"optimizer {index}.{key}"
