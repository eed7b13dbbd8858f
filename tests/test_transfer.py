"""Stage `transfer`: the DeiT recipe's pieces against hand-written formulas, a tiny end-to-end
fine-tuning run (shards and a source read in place), and exact resume after a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import shard, transfer
from stages.cli import StageError
from stages.fingerprinted_checkpoint import load_checkpoint
from stages.params import Params, Transfer, validate_params
from tiny_config import save_random_teacher, tiny_params, write_params

FAST = {
    "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1, "crop_size": 16, "resize": 16,
    "crop_scale": [0.5, 1.0], "num_workers": 0, "device": "cpu", "precision": "fp32",
}


def _params(root: Path, **transfer_overrides) -> Params:
    raw = tiny_params(root, dataset={"subset": {"train": 48, "val": 24}}, transfer={**FAST, **transfer_overrides})
    raw["paths"]["transfer"] = str(root / "models/transfer")
    return validate_params(raw)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Shards of 48/24 digits and a random teacher backbone in the pretrain stage's format."""
    root = tmp_path_factory.mktemp("transfer_data")
    params = _params(root)
    shard.run(params)
    with torch.random.fork_rng(devices=[]):
        save_random_teacher(params, seed=123)
    return root


def _run_dir(data_root: Path, name: str, **overrides) -> Params:
    """Params reading data_root's shards and backbone, writing under data_root/name."""
    params = _params(data_root, **overrides)
    out = data_root / name
    paths = params.paths.model_copy(update={"metrics": str(out / "metrics"), "transfer": str(out / "transfer")})
    return params.model_copy(update={"paths": paths})


@pytest.fixture(scope="module")
def straight(data_root: Path) -> tuple[Params, dict]:
    params = _run_dir(data_root, "straight")
    return params, transfer.run(params)


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------

DEIT_DEFAULTS = {  # DeiT's main.py defaults; batch and epochs as the authors' CIFAR fine-tuning
    "lr": 5e-4, "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_epochs": 5, "weight_decay": 0.05,
    "label_smoothing": 0.1, "drop_path_rate": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5,
    "randaugment_ops": 2, "randaugment_magnitude": 9, "crop_scale": (0.08, 1.0), "crop_size": 224,
    "resize": 256, "batch_size": 768, "epochs": 1000, "dataset": None,
}


@pytest.mark.parametrize("key,expected", DEIT_DEFAULTS.items())
def test_defaults_are_deits(key: str, expected) -> None:
    assert getattr(Transfer(), key) == expected


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = Transfer(epochs=4, warmup_epochs=1, batch_size=256, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    lrs = transfer.lr_schedule(cfg, steps_per_epoch=3)
    peak = 1e-3 * 256 / 512
    assert lrs.shape == (12,)
    np.testing.assert_allclose(lrs[:3], [1e-6, (1e-6 + peak) / 2, peak])
    expected = [1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * i / 9)) for i in range(9)]
    np.testing.assert_allclose(lrs[3:], expected)


def test_weight_decay_only_on_weights(data_root: Path) -> None:
    model = transfer.build_model(_params(data_root), num_classes=10)
    decay, no_decay = transfer.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "head.bias", "backbone.norm.weight"} <= undecayed
    assert {"head.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight"} <= decayed
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


def test_label_smoothing_cross_entropy_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    targets = transfer.smooth_one_hot(torch.from_numpy(labels), 4, 0.1)
    expected_t = np.full((5, 4), 0.1 / 4)
    expected_t[np.arange(5), labels] = 0.9 + 0.1 / 4
    np.testing.assert_allclose(targets.numpy(), expected_t, rtol=1e-6)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = float(np.mean([-(expected_t[i] * log_p[i]).sum() for i in range(5)]))
    got = transfer.soft_cross_entropy(torch.from_numpy(logits), targets.double())
    assert float(got) == pytest.approx(expected, rel=1e-6)


def _constant_images(batch: int, size: int = 8) -> torch.Tensor:
    """Image b is filled with the value b (so every pixel tells where it came from)."""
    return torch.arange(batch, dtype=torch.float32).reshape(batch, 1, 1, 1).expand(batch, 3, size, size).clone()


def test_mixup_mixes_with_the_reversed_batch() -> None:
    images, labels = _constant_images(4), torch.tensor([0, 1, 2, 2])
    targets = transfer.smooth_one_hot(labels, 3, 0.0)
    mixed, mixed_t, lam = transfer.mix_batch(images, targets, mixup=0.8, cutmix=0.0, switch_prob=0.5,
                                             rng=np.random.default_rng(5))
    assert lam == pytest.approx(np.random.default_rng(5).beta(0.8, 0.8))  # the first draw is lam
    for b in range(4):
        partner = 3 - b
        assert torch.allclose(mixed[b], torch.full((3, 8, 8), lam * b + (1 - lam) * partner))
        expected = np.zeros(3)
        expected[labels[b]] += lam
        expected[labels[partner]] += 1 - lam
        np.testing.assert_allclose(mixed_t[b].numpy(), expected, rtol=1e-6)


def test_cutmix_pastes_a_box_and_corrects_lambda() -> None:
    images, labels = _constant_images(4, size=10), torch.tensor([0, 1, 2, 3])
    targets = transfer.smooth_one_hot(labels, 4, 0.0)
    for seed in range(20):
        mixed, mixed_t, lam = transfer.mix_batch(images, targets, mixup=0.0, cutmix=1.0, switch_prob=0.5,
                                                 rng=np.random.default_rng(seed))
        for b in range(4):
            pasted = (mixed[b, 0] == 3 - b) & (mixed[b, 0] != b)
            own = mixed[b, 0] == b
            assert bool((pasted | own).all())
            if b in (0, 3):  # the image differs from its partner: count the pasted pixels
                kept = float(own.float().mean())
                assert lam == pytest.approx(kept)
                assert float(mixed_t[b, labels[b]]) == pytest.approx(kept)
                assert float(mixed_t[b, labels[3 - b]]) == pytest.approx(1 - kept)
            if b in (0, 3) and lam < 1:  # the pasted region is one rectangle
                rows, cols = np.nonzero(pasted.numpy())
                assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixing_off_returns_the_batch() -> None:
    images, targets = _constant_images(2), transfer.smooth_one_hot(torch.tensor([0, 1]), 2, 0.1)
    out, out_t, lam = transfer.mix_batch(images, targets, 0.0, 0.0, 0.5, np.random.default_rng(0))
    assert lam == 1.0 and out is images and out_t is targets


def test_epoch_indices_cover_the_set_over_ranks() -> None:
    parts = [transfer.epoch_indices(10, 3, 1, rank, 4) for rank in range(4)]
    assert all(len(p) == 3 for p in parts)
    assert set(np.concatenate(parts)) == set(range(10))
    np.testing.assert_array_equal(transfer.epoch_indices(10, 3, 1), np.random.default_rng([3, 1]).permutation(10))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def test_fine_tunes_and_writes_metrics(data_root: Path, straight: tuple[Params, dict]) -> None:
    params, metrics = straight
    written = json.loads((Path(params.paths.metrics) / "transfer.json").read_text())
    assert written == metrics
    assert all(isinstance(v, float) for v in written.values())
    assert metrics["n_train"] == 48 and metrics["n_val"] == 24 and metrics["num_classes"] == 10
    assert metrics["epochs"] == 2 and metrics["lr"] == pytest.approx(0.05 * 16 / 512)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and math.isfinite(metrics["loss"])
    assert metrics["top1_best"] >= metrics["top1"] and metrics["best_epoch"] in (1.0, 2.0)
    # accuracies are whole images out of 24
    assert metrics["top1"] * 24 / 100 == pytest.approx(round(metrics["top1"] * 24 / 100))
    state = torch.load(Path(params.paths.transfer) / transfer.CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    # the backbone itself was trained, not only the head
    start = torch.load(params.paths.teacher_backbone, weights_only=True)["teacher_backbone"]
    tuned = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert set(tuned) == set(start)
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    # the reported accuracy is the checkpoint's: recompute it independently, image by image
    model = transfer.build_model(params, 10)
    model.load_state_dict(state["model"])
    model.eval()
    _, val, _, _ = transfer.open_splits(params)
    hits = 0
    with torch.no_grad():
        for i in range(len(val)):
            image, label = val[(0, i)]
            hits += int(model(image[None]).argmax(1).item() == label)
    assert metrics["top1"] == pytest.approx(100.0 * hits / 24)


class _Killed(Exception):
    pass


def test_exact_resume_after_a_kill(data_root: Path, straight: tuple[Params, dict], monkeypatch) -> None:
    params = _run_dir(data_root, "resumed")
    original = transfer.save_checkpoint

    def save_then_die(directory, state):
        path = original(directory, state)
        if state["epoch"] == 1:
            raise _Killed
        return path

    monkeypatch.setattr(transfer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        transfer.run(params)
    assert not (Path(params.paths.metrics) / "transfer.json").exists()
    monkeypatch.setattr(transfer, "save_checkpoint", original)
    torch.manual_seed(999)  # the caller's RNG state must not matter
    resumed = transfer.run(params)

    straight_params, straight_metrics = straight
    assert resumed == straight_metrics
    a = torch.load(Path(straight_params.paths.transfer) / transfer.CHECKPOINT_NAME, weights_only=True)
    b = torch.load(Path(params.paths.transfer) / transfer.CHECKPOINT_NAME, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"]


def test_other_params_start_over(data_root: Path, straight: tuple[Params, dict], caplog) -> None:
    params, _ = straight
    stored = torch.load(Path(params.paths.transfer) / transfer.CHECKPOINT_NAME, weights_only=True)["fingerprint"]

    def fingerprint(**changes) -> dict:
        cfg = params.transfer.model_copy(update=changes)
        return transfer._fingerprint(params.model_copy(update={"transfer": cfg}), stored["backbone_sha256"],
                                     stored["data"])

    assert load_checkpoint(params.paths.transfer, fingerprint(num_workers=3, device="auto")) is not None
    assert load_checkpoint(params.paths.transfer, fingerprint(label_smoothing=0.2)) is None
    assert "starting from scratch" in caplog.text


def test_source_read_in_place_through_the_cli(tmp_path: Path, data_root: Path) -> None:
    raw = tiny_params(tmp_path, transfer={
        **FAST, "epochs": 1, "warmup_epochs": 0, "mixup": 0.0, "cutmix": 0.0,
        "dataset": {"source": "digits", "root": None, "subset": {"train": 20, "val": 10}},
    })
    raw["paths"]["teacher_backbone"] = str(data_root / "models/teacher_backbone.pth")
    raw["paths"]["transfer"] = str(tmp_path / "transfer")
    assert transfer.main(["--params", str(write_params(tmp_path / "params.yaml", raw))]) == 0
    metrics = json.loads((tmp_path / "metrics/transfer.json").read_text())
    assert metrics["n_train"] == 20 and metrics["n_val"] == 10 and metrics["num_classes"] == 10
    assert not (tmp_path / "data").exists()  # no shards were needed


def test_missing_backbone_names_the_file(tmp_path: Path, data_root: Path) -> None:
    params = _params(data_root)
    missing = str(tmp_path / "nope.pth")
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"teacher_backbone": missing})})
    with pytest.raises(StageError, match="nope.pth"):
        transfer.run(params)
