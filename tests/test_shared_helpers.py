"""The small shared pieces the stages use: params device -> torch.device, file sha256, and the
fingerprinted (linear/transfer) checkpoint."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from stages.cli import StageError
from stages.device import device_constant, resolve_device
from stages.file_digest import file_sha256
from stages.fingerprinted_checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint


def test_resolve_device_cpu_and_auto_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu", "extract.device") == torch.device("cpu")
    assert resolve_device("auto", "extract.device") == torch.device("cpu")
    # "auto" takes the launcher's device when one is given
    assert resolve_device("auto", "linear.device", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(StageError, match=r"^davis.device = 'cuda' but CUDA is not available"):
        resolve_device("cuda", "davis.device")
    with pytest.raises(StageError, match="transfer.device = 'cuda'"):
        resolve_device("cuda", "transfer.device", torch.device("cpu"))
    with pytest.raises(StageError, match="retrieval.device = 'gpu': allowed are 'auto', 'cpu' and 'cuda'"):
        resolve_device("gpu", "retrieval.device")


def test_resolve_device_with_cuda_keeps_the_ranks_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch.device needs no GPU
    rank_gpu = torch.device("cuda", 1)
    assert resolve_device("cpu", "extract.device", rank_gpu) == torch.device("cpu")
    assert resolve_device("cuda", "extract.device", rank_gpu) == rank_gpu
    assert resolve_device("auto", "extract.device", rank_gpu) == rank_gpu
    assert resolve_device("cuda", "extract.device", torch.device("cpu")) == torch.device("cuda")
    assert resolve_device("cuda", "attention.device") == torch.device("cuda")
    assert resolve_device("auto", "attention.device") == torch.device("cuda")


def test_device_constant_is_made_once_per_device_and_dtype() -> None:
    """Made per batch, a constant would be a blocking copy to a GPU; it is made once and shared."""
    mean = device_constant((0.485, 0.456, 0.406), torch.device("cpu"))
    assert mean is device_constant((0.485, 0.456, 0.406), torch.device("cpu"))
    assert mean.dtype == torch.float32 and mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    wide = device_constant((0.485, 0.456, 0.406), torch.device("cpu"), torch.float64)
    assert wide is not mean and wide.dtype == torch.float64


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_file_sha256_matches_hashlib_on_whole_bytes(tmp_path: Path, size: int) -> None:
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert file_sha256(str(path), chunk=1024) == expected  # chunk boundaries do not matter
    assert file_sha256(path, chunk=7) == expected


def test_fingerprinted_checkpoint_round_trip_and_mismatch(tmp_path: Path, caplog) -> None:
    fingerprint = {"linear": {"lr": 0.001, "epochs": 100}, "source_sha256": "abc"}
    assert load_checkpoint(tmp_path, fingerprint) is None  # nothing yet
    state = {"classifier": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "fingerprint": fingerprint}
    path = save_checkpoint(tmp_path / "out", state)
    assert path == tmp_path / "out" / CHECKPOINT_NAME and path.is_file()
    loaded = load_checkpoint(tmp_path / "out", {"linear": {"lr": 0.001, "epochs": 100}, "source_sha256": "abc"})
    assert loaded is not None and loaded["epoch"] == 3
    assert torch.equal(loaded["classifier"]["w"], torch.arange(6.0).reshape(2, 3))
    other = {"linear": {"lr": 0.001, "epochs": 100}, "source_sha256": "def"}
    with caplog.at_level(logging.WARNING, logger="stages.fingerprinted_checkpoint"):
        assert load_checkpoint(tmp_path / "out", other) is None
    assert "made with other params (source_sha256): starting from scratch" in caplog.text
    assert path.is_file()  # left alone


def test_fingerprinted_checkpoint_unreadable_names_the_file_and_stage(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a torch file")
    with pytest.raises(StageError, match=rf"{CHECKPOINT_NAME}: unreadable transfer checkpoint"):
        load_checkpoint(tmp_path, {}, what="transfer")


def test_backbone_kwargs_and_load_teacher(tmp_path: Path) -> None:
    from stages.dino.backbones import backbone_kwargs
    from stages.dino.checkpoint import load_teacher, teacher_path
    from stages.params import validate_params
    from tiny_config import save_random_teacher, tiny_params

    params = validate_params(tiny_params(tmp_path))
    assert backbone_kwargs(params.model) == {"img_size": 16, "in_chans": 3, "embed_dim": 32, "depth": 2,
                                             "num_heads": 2}
    reference_size = params.model.model_copy(update={"embed_dim": None, "depth": None, "num_heads": None})
    assert backbone_kwargs(reference_size) == {"img_size": 16, "in_chans": 3}
    with pytest.raises(StageError, match="teacher_backbone.pth: teacher backbone not found"):
        teacher_path(params)
    with pytest.raises(StageError, match="teacher backbone not found"):
        load_teacher(params)
    saved = save_random_teacher(params, seed=5)
    loaded = load_teacher(params)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert len(loaded.blocks) == 2 and loaded.embed_dim == 32
    # build overrides reach build_backbone: stochastic depth linearly up to the rate, as transfer asks
    with_drop = load_teacher(params, drop_path_rate=0.2)
    assert [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in with_drop.blocks] == pytest.approx([0.0, 0.2])


def test_resume_loads_every_state_dict_or_starts_from_scratch(tmp_path: Path) -> None:
    from stages.fingerprinted_checkpoint import NO_BEST, resume

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer state worth restoring
    start, history, best = resume(tmp_path, {"a": 1}, "linear", {"classifier": layer, "optimizer": optimizer})
    assert (start, history, best) == (0, [], NO_BEST) and best is not NO_BEST
    rows = [{"epoch": 1, "loss": 0.5, "lr": 0.1, "top1": 40.0, "top5": 90.0}]
    save_checkpoint(tmp_path, {"classifier": layer.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1,
                               "history": rows, "best": {"top1": 40.0, "top5": 90.0, "epoch": 1},
                               "fingerprint": {"a": 1}})
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    start, history, best = resume(tmp_path, {"a": 1}, "linear", {"classifier": fresh, "optimizer": fresh_opt})
    assert (start, history, best) == (1, rows, {"top1": 40.0, "top5": 90.0, "epoch": 1})
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.bias, layer.bias)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert resume(tmp_path, {"a": 2}, "linear", {"classifier": fresh})[0] == 0  # other params: from scratch
