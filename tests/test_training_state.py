"""Checkpoint files: two deep, atomic, a corrupt latest is named and skipped."""

import logging

import torch

from stages.dino.training_state import LATEST, PREVIOUS, load_latest, params_mismatch, save_checkpoint


def state(step: int) -> dict:
    return {"global_step": step, "teacher": {"w": torch.full((3,), float(step))}}


def test_latest_and_previous(tmp_path):
    assert load_latest(tmp_path) is None
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    loaded, path = load_latest(tmp_path)
    assert path.name == LATEST and loaded["global_step"] == 2
    assert torch.load(tmp_path / PREVIOUS)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, PREVIOUS])  # no temp files left


def test_truncated_latest_falls_back_to_previous(tmp_path, caplog):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    data = (tmp_path / LATEST).read_bytes()
    (tmp_path / LATEST).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR):
        loaded, path = load_latest(tmp_path)
    assert path.name == PREVIOUS and loaded["global_step"] == 1
    assert str(tmp_path / LATEST) in caplog.text


def test_garbage_everywhere_means_no_checkpoint(tmp_path):
    (tmp_path / LATEST).write_bytes(b"not a checkpoint")
    (tmp_path / PREVIOUS).write_bytes(b"")
    assert load_latest(tmp_path) is None


def test_params_mismatch_ignores_run_only_keys():
    saved = {"pretrain": {"lr": 0.1, "num_workers": 2}, "model": {"arch": "vit_tiny"}}
    same = {"pretrain": {"lr": 0.1, "num_workers": 8}, "model": {"arch": "vit_tiny"}}
    other = {"pretrain": {"lr": 0.2, "num_workers": 2}, "model": {"arch": "vit_small"}}
    assert params_mismatch(saved, same) == []
    assert params_mismatch(saved, other) == ["model.arch", "pretrain.lr"]


def test_params_mismatch_reads_a_key_the_checkpoint_lacks_as_its_default():
    """A checkpoint written before `koleo_weight` existed resumes under the default (off), and
    only under it; the same for a tuple-valued default."""
    saved = {"pretrain": {"lr": 0.1}}
    assert params_mismatch(saved, {"pretrain": {"lr": 0.1, "koleo_weight": 0.0}}) == []
    assert params_mismatch(saved, {"pretrain": {"lr": 0.1, "koleo_weight": 0.1}}) == ["pretrain.koleo_weight"]
    assert params_mismatch(saved, {"pretrain": {"lr": 0.1, "blur_radius": [0.1, 2.0]}}) == []
