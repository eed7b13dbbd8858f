"""Linear evaluation: schedule and sampler against torch's, accuracy on separable features checked
with numpy, exact resume after a kill, the full (image) mode end to end on tiny shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import stages.linear as linear
from stages.features import write_features
from stages.params import ParamsError, Params, validate_params
from tiny_config import save_random_teacher, tiny_params


def eval_config(root: Path, **overrides: dict) -> dict:
    """The tiny params with the paths conftest does not know (yet) moved under `root` too."""
    params = tiny_params(root, **overrides)
    params["paths"].setdefault("linear", str(root / "models/linear"))
    params["paths"].setdefault("fewshot_subsets", str(root / "metrics/fewshot_subsets.json"))
    return params


def tiny_pipeline(root: Path, subset: dict | None = None, seed: int = 0, **overrides: dict) -> Params:
    """Shards of the tiny digits config, a random tiny ViT saved as the teacher backbone, and its
    extracted features: what the evaluation stages read."""
    import stages.extract
    import stages.shard

    config = eval_config(root, **overrides)
    if subset is not None:
        config["dataset"]["subset"] = subset
    params = validate_params(config)
    stages.shard.run(params)
    save_random_teacher(params, seed)
    stages.extract.run(params)
    return params


def separable_features(root: Path, n_classes: int = 5, dim: int = 16, n_train: int = 200, n_val: int = 100,
                       seed: int = 0) -> None:
    """Gaussian clusters around orthogonal means (margin >> noise), as a features folder."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.eye(dim)[:n_classes]
    for split, n in (("train", n_train), ("val", n_val)):
        labels = rng.integers(0, n_classes, size=n)
        feats = centres[labels] + 0.3 * rng.standard_normal((n, dim))
        keys = [f"{split}_{i:05d}" for i in range(n)]
        meta = {"num_classes": n_classes, "classes": [f"c{i}" for i in range(n_classes)], "pooling": "cls",
                "checkpoint_sha256": "synthetic"}
        write_features(root / split, feats.astype(np.float32), labels, keys, meta)


FAST = {"mode": "features", "batch_size": 32, "lr": 2.0, "num_workers": 0, "device": "cpu"}


def features_params(root: Path, **linear_overrides) -> Params:
    return validate_params(eval_config(root, linear={**FAST, **linear_overrides}))


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_cosine_lr_is_torch_cosine_annealing_stepped_per_epoch() -> None:
    epochs, base = 7, 0.3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(linear.cosine_lr(base, epochs), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (3, 5)])
def test_epoch_indices_split_a_padded_permutation(n: int, world: int) -> None:
    parts = [linear.epoch_indices(n, seed=3, epoch=2, rank=r, world_size=world) for r in range(world)]
    per_rank = math.ceil(n / world)
    assert all(len(p) == per_rank for p in parts)
    together = np.concatenate(parts)
    assert set(together.tolist()) == set(range(n))  # every sample, padding only repeats
    assert len(together) - n == per_rank * world - n
    order = np.random.default_rng([3, 2]).permutation(n)
    padded = np.concatenate([order, order[: per_rank * world - n]])
    for r in range(world):
        np.testing.assert_array_equal(parts[r], padded[r::world])
    assert not np.array_equal(linear.epoch_indices(50, 3, 0), linear.epoch_indices(50, 3, 1))


def test_classifier_init_is_the_references() -> None:
    torch.manual_seed(0)
    clf = linear.LinearClassifier(400, 100)
    assert torch.count_nonzero(clf.linear.bias) == 0
    assert abs(clf.linear.weight.std().item() - 0.01) < 0.0005
    assert abs(clf.linear.weight.mean().item()) < 0.0005


def test_topk_correct_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    top1, top5 = linear.topk_correct(logits, labels)
    assert top1 == 1 and top5 == 3  # 3 classes: top-5 is top-3


def test_avgpool_needs_one_block() -> None:
    with pytest.raises(ParamsError, match="linear.n_last_blocks"):
        validate_params({"linear": {"avgpool_patchtokens": True, "n_last_blocks": 4}})
    assert validate_params({"linear": {"avgpool_patchtokens": True, "n_last_blocks": 1}}).linear.avgpool_patchtokens


# ------------------------------------------------------------------------------------------------
# the stage, features mode
# ------------------------------------------------------------------------------------------------


def _numpy_accuracy(state: dict, features_dir: Path) -> float:
    feats = np.load(features_dir / "features.npy").astype(np.float64)
    labels = np.load(features_dir / "labels.npy")
    weight = state["classifier"]["linear.weight"].double().numpy()
    bias = state["classifier"]["linear.bias"].double().numpy()
    return 100.0 * float(np.mean(np.argmax(feats @ weight.T + bias, axis=1) == labels))


def test_features_mode_reaches_high_accuracy_on_separable_features(tmp_path: Path) -> None:
    params = features_params(tmp_path, epochs=10)
    separable_features(Path(params.paths.features))
    metrics = linear.run(params)
    assert metrics["top1"] >= 98.0 and metrics["top1_best"] >= metrics["top1"]
    assert metrics["top5"] == 100.0 and metrics["epochs"] == 10 and metrics["n_train"] == 200
    assert metrics["lr"] == pytest.approx(2.0 * 32 / 256)
    written = json.loads((Path(params.paths.metrics) / "linear.json").read_text())
    assert written == pytest.approx(metrics)
    state = torch.load(Path(params.paths.linear) / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 10
    # The last epoch's top-1, recomputed from the stored weights with numpy.
    assert _numpy_accuracy(state, Path(params.paths.features) / "val") == pytest.approx(metrics["top1"])
    # Before training (zero-ish weights) the same data is not classified: the layer learnt it.
    assert metrics["loss"] < 0.1


def test_features_mode_warns_when_extract_pooled_unlike_the_protocol(tmp_path: Path, caplog) -> None:
    two = validate_params(eval_config(tmp_path, linear={"n_last_blocks": 2}))  # the tiny ViT has 2 blocks
    one = validate_params(eval_config(tmp_path, linear={"n_last_blocks": 1}))
    with caplog.at_level("WARNING", logger="stages.linear"):
        linear._warn_unlike_full_mode(two, {"pooling": "last_blocks", "n_last_blocks": 2}, tmp_path)
        linear._warn_unlike_full_mode(one, {"pooling": "cls"}, tmp_path)  # the last block's CLS either way
        assert caplog.text == ""
        linear._warn_unlike_full_mode(two, {"pooling": "cls"}, tmp_path)
    assert "trains on the cls features" in caplog.text and "would pool last_blocks 2" in caplog.text


class Killed(Exception):
    pass


@pytest.mark.faults
def test_resume_after_a_kill_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = features_params(tmp_path / "straight", epochs=6, val_freq=2)
    separable_features(Path(straight.paths.features), seed=1)
    expected = linear.run(straight)

    killed = features_params(tmp_path / "killed", epochs=6, val_freq=2)
    separable_features(Path(killed.paths.features), seed=1)
    real_save, saved = linear.save_checkpoint, []

    def save_then_die(directory, state):
        path = real_save(directory, state)
        saved.append(state["epoch"])
        if state["epoch"] == 3:
            raise Killed
        return path

    monkeypatch.setattr(linear, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        linear.run(killed)
    assert saved == [1, 2, 3] and not (Path(killed.paths.metrics) / "linear.json").exists()
    resumed = linear.run(killed)
    assert saved == [1, 2, 3, 4, 5, 6]  # epochs 1-3 were not redone
    assert resumed == expected
    a = torch.load(Path(straight.paths.linear) / "checkpoint.pth", weights_only=True)
    b = torch.load(Path(killed.paths.linear) / "checkpoint.pth", weights_only=True)
    for key in a["classifier"]:
        assert torch.equal(a["classifier"][key], b["classifier"][key]), key
    assert a["history"] == b["history"]
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))


def test_other_params_start_from_scratch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = features_params(tmp_path, epochs=2)
    separable_features(Path(params.paths.features))
    linear.run(params)
    changed = features_params(tmp_path, epochs=2, lr=1.0)
    with caplog.at_level("WARNING", logger="stages.linear"):
        linear.run(changed)
    assert "starting from scratch" in caplog.text
    state = torch.load(Path(params.paths.linear) / "checkpoint.pth", weights_only=True)
    assert state["fingerprint"]["linear"]["lr"] == 1.0 and [r["epoch"] for r in state["history"]] == [1, 2]


def test_other_features_of_the_same_checkpoint_start_from_scratch(tmp_path: Path, caplog) -> None:
    """e.g. `dvc exp run -S extract.resize=32`: new features, the same checkpoint, pooling and shape."""
    params = features_params(tmp_path, epochs=2)
    separable_features(Path(params.paths.features), seed=0)
    first = linear.run(params)
    separable_features(Path(params.paths.features), seed=1)
    with caplog.at_level("WARNING", logger="stages.linear"):
        second = linear.run(params)
    assert "starting from scratch" in caplog.text and second != first


# ------------------------------------------------------------------------------------------------
# the stage, full mode (augmented images through the frozen backbone)
# ------------------------------------------------------------------------------------------------


@pytest.mark.faults
def test_full_mode_runs_on_tiny_images_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = {"mode": "full", "epochs": 2, "batch_size": 32, "lr": 0.5, "num_workers": 0, "device": "cpu",
            "train_crop_size": 16, "resize": 16, "crop_size": 16, "n_last_blocks": 2}
    params = tiny_pipeline(tmp_path, subset={"train": 96, "val": 40}, linear=full)
    metrics = linear.run(params)
    assert set(metrics) >= {"top1", "top5", "top1_best", "top5_best", "best_epoch", "n_train", "n_val"}
    assert metrics["n_train"] == 96 and metrics["n_val"] == 40
    assert json.loads((Path(params.paths.metrics) / "linear.json").read_text()) == pytest.approx(metrics)
    state = torch.load(Path(params.paths.linear) / "checkpoint.pth", weights_only=True)
    assert state["classifier"]["linear.weight"].shape == (10, 2 * 32)  # last 2 CLS tokens of a 32-d ViT

    # Killed after epoch 1, then resumed: the same weights as the uninterrupted run.
    real_save = linear.save_checkpoint

    def save_then_die(directory, state):
        real_save(directory, state)
        if state["epoch"] == 1:
            raise Killed

    dumped = params.model_dump(mode="json")
    other = validate_params({**dumped, "paths": {**dumped["paths"], "linear": str(tmp_path / "other")}})
    monkeypatch.setattr(linear, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        linear.run(other)
    monkeypatch.setattr(linear, "save_checkpoint", real_save)
    assert linear.run(other) == metrics
    resumed = torch.load(Path(other.paths.linear) / "checkpoint.pth", weights_only=True)
    assert torch.equal(resumed["classifier"]["linear.weight"], state["classifier"]["linear.weight"])


# ------------------------------------------------------------------------------------------------
# two processes (gloo, torchrun's variables): DistributedDataParallel over strided batches
# ------------------------------------------------------------------------------------------------

DDP_WORKER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_linear import features_params
import stages.linear as linear
from stages.distributed import cleanup
metrics = linear.run(features_params(Path(sys.argv[1]), epochs=4))
print("METRICS", json.dumps(metrics))
cleanup()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_train_the_same_layer_as_one(tmp_path: Path) -> None:
    """With a per-rank batch of half the global batch and a sample count divisible by it, DDP's
    averaged gradient is the single process's: the same weights up to float summation order."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(tests=str(repo / "tests")))
    for name in ("single", "ddp"):
        separable_features(Path(features_params(tmp_path / name).paths.features), n_train=256, n_val=100)
    single = linear.run(features_params(tmp_path / "single", epochs=4))

    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", PYTHONPATH=str(repo),
                CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "ddp")],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = []
    try:
        outputs = [proc.communicate(timeout=200)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    per_rank = [json.loads(line.split("METRICS ", 1)[1]) for out in outputs for line in out.splitlines()
                if line.startswith("METRICS ")]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]  # the loss is averaged over the ranks
    assert per_rank[0] == pytest.approx(single, rel=1e-4, abs=1e-6)
    a = torch.load(tmp_path / "single/models/linear/checkpoint.pth", weights_only=True)["classifier"]
    b = torch.load(tmp_path / "ddp/models/linear/checkpoint.pth", weights_only=True)["classifier"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
