"""Loading the reference implementation's checkpoint layouts (and ours): files are built here with
torch.save in each layout, loaded back, and must reproduce the source model's outputs exactly."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from stages.cli import StageError
from stages.dino.backbones import build_backbone, interpolate_pos_embed
from stages.dino.checkpoint import CheckpointError, clean_state_dict, load_backbone, load_head_state

TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=2)  # with patch_size=4


def _vit(seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("vit_small", patch_size=4, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ref_head(seed: int, in_dim: int = 32, out_dim: int = 10, hidden: int = 24, bottleneck: int = 8) -> nn.Module:
    """The reference's DINOHead layout: mlp Sequential + old-style weight_norm (weight_g/weight_v)."""
    torch.manual_seed(seed)
    head = nn.Module()
    head.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, bottleneck))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        head.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    return head


def _param_head(in_dim: int = 32, out_dim: int = 10, hidden: int = 24, bottleneck: int = 8) -> nn.Module:
    """A head as ours: torch.nn.utils.parametrizations.weight_norm (original0/original1)."""
    head = nn.Module()
    head.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, bottleneck))
    head.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    return head


def _head_out(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head.last_layer(nn.functional.normalize(head.mlp(x), dim=-1))


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _assert_same_outputs(a: nn.Module, b: nn.Module, sizes=((16, 16), (24, 16))) -> None:
    with torch.no_grad():
        for hw in sizes:
            x = torch.randn(3, 3, *hw)
            assert torch.equal(a(x), b(x))


# --- clean_state_dict -------------------------------------------------------------------------------


def test_clean_state_dict():
    t = torch.zeros(1)
    sd = {"module.backbone.a": t, "module.head.b": t, "backbone.c": t, "d": t}
    assert set(clean_state_dict(sd)) == {"backbone.a", "head.b", "backbone.c", "d"}
    assert set(clean_state_dict(sd, prefix="backbone.")) == {"a", "c"}
    assert set(clean_state_dict(sd, prefix="head.")) == {"b"}
    assert clean_state_dict({"module.module.x": t}) == {"x": t}


# --- backbone layouts ----------------------------------------------------------------------------


def test_reference_backbone_only_file(tmp_path: Path):
    """dino_deitsmall16_pretrain.pth layout: the backbone's own keys, nothing else."""
    source = _vit(0)
    keys = set(source.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= keys
    path = tmp_path / "dino_deitsmall4_pretrain.pth"
    torch.save(source.state_dict(), path)
    loaded = load_backbone(path, "vit_small", 4, **TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_outputs(source, loaded)


def test_reference_training_checkpoint(tmp_path: Path):
    """main_dino.py's checkpoint.pth: DDP student ("module.backbone."), plain teacher, argparse args."""
    student, teacher = _vit(1), _vit(2)
    head_s, head_t = _ref_head(3), _ref_head(4)
    args = argparse.Namespace(arch="vit_small", patch_size=4, out_dim=10)
    path = tmp_path / "checkpoint.pth"
    torch.save({
        "student": {**_prefixed(student.state_dict(), "module.backbone."), **_prefixed(head_s.state_dict(), "module.head.")},
        "teacher": {**_prefixed(teacher.state_dict(), "backbone."), **_prefixed(head_t.state_dict(), "head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 10)},
    }, path)
    _assert_same_outputs(teacher, load_backbone(path, "vit_small", 4, **TINY))
    _assert_same_outputs(student, load_backbone(path, "vit_small", 4, which="student", **TINY))
    with pytest.raises(CheckpointError, match=r"says it holds vit_small/4.*vit_small/8"):
        load_backbone(path, "vit_small", 8, **TINY)
    # the heads, from the same dicts (weight_g/weight_v -> parametrizations)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    x = torch.randn(5, 32)
    for sd, source in ((ckpt["student"], head_s), (ckpt["teacher"], head_t)):
        head = load_head_state(_param_head(), sd)
        with torch.no_grad():
            assert torch.allclose(_head_out(head, x), _head_out(source, x), atol=1e-6)
        g = head.last_layer.parametrizations.weight.original0
        assert torch.equal(g, source.last_layer.weight_g)


def test_our_formats(tmp_path: Path):
    teacher, student = _vit(5), _vit(6)
    exported = tmp_path / "teacher_backbone.pth"
    torch.save({"teacher_backbone": teacher.state_dict(), "model": {"arch": "vit_small", "patch_size": 4},
                "global_step": 7}, exported)
    _assert_same_outputs(teacher, load_backbone(exported, "vit_small", 4, **TINY))
    with pytest.raises(CheckpointError, match="no student backbone found.*teacher_backbone"):
        load_backbone(exported, "vit_small", 4, which="student", **TINY)
    with pytest.raises(CheckpointError, match=r"says it holds vit_small/4 \(arch/patch_size\), but vit_tiny/4"):
        load_backbone(exported, "vit_tiny", 4, **TINY)
    # training checkpoint: MultiCropModel dicts (backbone./head./predictor.) + validated params
    training = tmp_path / "checkpoint.pth"
    head = _param_head()
    torch.save({
        "student": {**_prefixed(student.state_dict(), "backbone."), **_prefixed(head.state_dict(), "head."),
                    "predictor.0.weight": torch.zeros(3, 3)},
        "teacher": {**_prefixed(teacher.state_dict(), "backbone."), **_prefixed(head.state_dict(), "head.")},
        "params": {"model": {"arch": "vit_small", "patch_size": 4}},
        "epoch": 1,
    }, training)
    _assert_same_outputs(teacher, load_backbone(training, "vit_small", 4, **TINY))
    _assert_same_outputs(student, load_backbone(training, "vit_small", 4, which="student", **TINY))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dicts(tmp_path: Path, wrapper: str):
    source = _vit(7)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: _prefixed(source.state_dict(), "module."), "epoch": 9}, path)
    _assert_same_outputs(source, load_backbone(path, "vit_small", 4, **TINY))


def test_pos_embed_resized_with_reference_interpolation(tmp_path: Path):
    """Trained at 16 px (4x4 patches), built for 24 px (6x6): the stored embedding is resized once
    with the reference's interpolation, so at 24 px the loaded model equals the source, which
    interpolates on the fly."""
    source = _vit(8)
    path = tmp_path / "at16.pth"
    torch.save(source.state_dict(), path)
    loaded = load_backbone(path, "vit_small", 4, **{**TINY, "img_size": 24})
    assert loaded.pos_embed.shape == (1, 37, 32)
    assert torch.equal(loaded.pos_embed, interpolate_pos_embed(source.pos_embed, 6, 6))
    _assert_same_outputs(source, loaded, sizes=((24, 24),))


def test_resnet50_reference_file(tmp_path: Path):
    torch.manual_seed(9)
    source = build_backbone("resnet50").eval()
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(_prefixed(source.state_dict(), "module."), path)
    loaded = load_backbone(path, "resnet50")
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(source(x), loaded(x))
    with pytest.raises(CheckpointError, match=r"resnet50\.pth: does not match vit_small/4.*missing keys: "
                                              r"blocks\.0\.attn\.proj\.bias.*unexpected keys: bn1\.bias"):
        load_backbone(path.rename(tmp_path / "resnet50.pth"), "vit_small", 4, **TINY)


# --- errors -------------------------------------------------------------------------------------------


def test_wrong_width_names_file_and_keys(tmp_path: Path):
    path = tmp_path / "w32.pth"
    torch.save(_vit(10).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "vit_small", 4, **{**TINY, "embed_dim": 48})
    msg = str(err.value)
    assert str(path) in msg and "does not match vit_small/4" in msg
    assert "cls_token (1, 1, 32) in the file, (1, 1, 48) in the model" in msg
    assert "embed_dim=32, patch_size=4, in_chans=3, depth=2" in msg
    assert isinstance(err.value, StageError)  # a stage's command line exits 1 with this message


def test_wrong_patch_size_and_depth(tmp_path: Path):
    path = tmp_path / "p4.pth"
    torch.save(_vit(11).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight \(32, 3, 4, 4\) in the file, "
                                              r"\(32, 3, 8, 8\) in the model.*patch_size=4"):
        load_backbone(path, "vit_small", 8, **TINY)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\..*depth=2"):
        load_backbone(path, "vit_small", 4, **{**TINY, "depth": 3})


def test_missing_and_unexpected_keys_refused(tmp_path: Path):
    sd = _vit(12).state_dict()
    del sd["norm.weight"]
    sd["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing keys: norm\.weight; unexpected keys: head\.weight"):
        load_backbone(path, "vit_small", 4, **TINY)


def test_unreadable_and_absent_files(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_backbone(tmp_path / "absent.pth", "vit_small", 4, **TINY)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: not a readable torch checkpoint"):
        load_backbone(bad, "vit_small", 4, **TINY)
    with pytest.raises(ValueError, match="which must be"):
        load_backbone(bad, "vit_small", 4, which="ema", **TINY)


# --- heads --------------------------------------------------------------------------------------------


def test_head_parametrized_to_old_style_and_back():
    x = torch.randn(4, 32)
    torch.manual_seed(13)
    ours = _param_head()
    with torch.no_grad():
        ours.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    ref = load_head_state(_ref_head(99), _prefixed(ours.state_dict(), "module.head."))
    with torch.no_grad():
        assert torch.allclose(_head_out(ref, x), _head_out(ours, x), atol=1e-6)
        # weight = g * v / ||v|| row-wise, recomputed here
        v, g = ref.last_layer.weight_v, ref.last_layer.weight_g
        assert torch.allclose(ref.last_layer.weight, g * v / v.norm(dim=1, keepdim=True), atol=1e-6)
    back = load_head_state(_param_head(), ref.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_head_errors():
    sd = _ref_head(14).state_dict()
    with pytest.raises(CheckpointError, match=r"shapes differ: .*original1 \(10, 8\) given, \(12, 8\) in the head"):
        load_head_state(_param_head(out_dim=12), sd)
    del sd["mlp.0.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: mlp\.0\.bias"):
        load_head_state(_param_head(), sd)


def test_head_with_our_dinohead():
    DINOHead = pytest.importorskip("stages.dino.head").DINOHead
    ref = _ref_head(15, in_dim=32, out_dim=10, hidden=24, bottleneck=8)
    head = DINOHead(32, 10, nlayers=3, hidden_dim=24, bottleneck_dim=8).eval()
    state = {**_prefixed(ref.state_dict(), "module.head."), "module.backbone.cls_token": torch.zeros(1, 1, 32)}
    load_head_state(head, state)
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(head(x), _head_out(ref, x), atol=1e-6)
