"""Backbones: the reference's ViT sizes, its position-embedding interpolation and forward pass,
intermediate layers and attention maps, checked against formulas written out here."""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.dino.backbones import (
    DinoVisionTransformer,
    build_backbone,
    build_backbone_from_params,
    interpolate_pos_embed,
)
from stages.params import validate_params

TINY = dict(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)


def _tiny(seed: int = 0, **kw) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", **{**TINY, **kw}).eval()
    with torch.no_grad():  # make every parameter matter (LN weights, biases are 1/0 at init)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.pos_embed.copy_(torch.randn_like(model.pos_embed))
    return model


# --- the reference, written out (facebookresearch/dino, vision_transformer.py) -------------------


def ref_interpolate_pos_encoding(pos_embed: torch.Tensor, x_tokens: torch.Tensor, w: int, h: int, patch: int):
    """VisionTransformer.interpolate_pos_encoding, with the reference's own names: it unpacks
    `B, nc, w, h = x.shape`, so its `w` is the image height (dim 2)."""
    npatch = x_tokens.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x_tokens.shape[-1]
    w0 = w // patch
    h0 = h // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def ref_prepare_tokens(sd: dict, x: torch.Tensor, patch: int) -> torch.Tensor:
    B, nc, w, h = x.shape
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2)
    tok = torch.cat((sd["cls_token"].expand(B, -1, -1), tok), dim=1)
    return tok + ref_interpolate_pos_encoding(sd["pos_embed"], tok, w, h, patch)


def ref_block(sd: dict, i: int, x: torch.Tensor, heads: int, return_attention: bool = False):
    p = f"blocks.{i}."
    B, N, C = x.shape
    y = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    if return_attention:
        return attn
    y = (attn @ v).transpose(1, 2).reshape(B, N, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    x = x + y
    y = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])


def ref_forward_tokens(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output through the final norm (the reference's get_intermediate_layers)."""
    sd = model.state_dict()
    tok = ref_prepare_tokens(sd, x, model.patch_size)
    out = []
    for i in range(len(model.blocks)):
        tok = ref_block(sd, i, tok, model.blocks[i].attn.num_heads)
        out.append(F.layer_norm(tok, (tok.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6))
    return out


# --- construction ----------------------------------------------------------------------------------


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="vit_tiny, vit_small, vit_base, resnet50"):
        build_backbone("vit_huge")


def _vit_param_count(dim: int, depth: int, patch: int, img: int, chans: int = 3) -> int:
    n = (img // patch) ** 2
    embed = dim * chans * patch * patch + dim + dim + (1 + n) * dim
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    return embed + depth * block + 2 * dim


@pytest.mark.parametrize(
    "arch,dim,heads,patch", [("vit_tiny", 192, 3, 16), ("vit_small", 384, 6, 16), ("vit_base", 768, 12, 8)]
)
def test_named_vit_sizes(arch, dim, heads, patch):
    with torch.device("meta"):  # shapes only: skips the costly random init of 22M-86M weights
        model = build_backbone(arch, patch_size=patch)
    assert model.embed_dim == dim and model.patch_size == patch
    assert len(model.blocks) == 12
    for block in model.blocks:
        assert block.attn.num_heads == heads
        assert block.attn.qkv.bias is not None
        assert block.mlp.fc1.out_features == 4 * dim
        assert block.norm1.eps == block.norm2.eps == 1e-6
    assert model.norm.eps == 1e-6
    assert sum(p.numel() for p in model.parameters()) == _vit_param_count(dim, 12, patch, 224)
    assert isinstance(model.head, nn.Identity)
    keys = set(model.state_dict())  # the reference's names, so its checkpoints load as they are
    block0 = {k for k in keys if k.startswith("blocks.0.")}
    assert block0 == {
        f"blocks.0.{m}.{t}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for t in ("weight", "bias")
    }
    assert keys - {k for k in keys if k.startswith("blocks.")} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    }
    assert len(keys) == 6 + 12 * 12


def test_init_as_reference():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny")
    for name in ("cls_token", "pos_embed"):  # trunc_normal_(std=.02), timm's cls token is N(0, 1e-6)
        std = getattr(model, name).std().item()
        assert 0.015 < std < 0.025, (name, std)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0) and 0.015 < m.weight.std().item() < 0.025
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_resnet50():
    with torch.device("meta"):  # shapes only (a real forward runs in test_checkpoint_compat)
        model = build_backbone("resnet50").eval()
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, 2048)
    assert model.embed_dim == 2048 and isinstance(model.fc, nn.Identity)
    assert not any(k.startswith("fc.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - (2048 * 1000 + 1000)  # torchvision minus fc
    with pytest.raises(ValueError, match="embed_dim"):
        build_backbone("resnet50", embed_dim=32)


def test_overrides_and_bad_sizes():
    model = build_backbone("vit_small", **TINY)
    assert model.embed_dim == 32 and len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 2
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    with pytest.raises(ValueError, match="num_heads=3 must divide embed_dim=32"):
        build_backbone("vit_small", embed_dim=32, num_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        model(torch.randn(1, 3, 18, 16))


def test_drop_path_student_only(tiny):
    params = validate_params(tiny)
    student = build_backbone_from_params(params.model.model_copy(update={"depth": 4}))
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in student.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # linspace(0, 0.1, depth), reference rule
    teacher = build_backbone_from_params(params.model, drop_path_rate=0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) and isinstance(b.drop_path2, nn.Identity) for b in teacher.blocks)
    x = torch.randn(4, 3, 16, 16)
    student.train()
    torch.manual_seed(1)
    a = student(x)
    torch.manual_seed(2)
    assert not torch.equal(a, student(x))  # stochastic in training
    student.eval()
    assert torch.equal(student(x), student(x))


# --- position-embedding interpolation --------------------------------------------------------------


@pytest.mark.parametrize("hw", [(16, 16), (24, 24), (8, 8), (12, 20), (20, 12), (8, 32), (4, 4), (64, 64)])
def test_interpolation_equals_reference(hw):
    model = _tiny()
    x = torch.randn(2, 3, *hw)
    tokens = model.patch_embed(x)  # (B, H/p, W/p, D)
    grid_h, grid_w = tokens.shape[1:3]
    ours = interpolate_pos_embed(model.pos_embed, grid_h, grid_w)
    flat = torch.zeros(1, 1 + grid_h * grid_w, model.embed_dim)
    ref = ref_interpolate_pos_encoding(model.pos_embed, flat, hw[0], hw[1], model.patch_size)
    assert ours.shape == (1, 1 + grid_h * grid_w, 32)
    assert torch.equal(ours, ref)
    if hw == (16, 16):
        assert ours is model.pos_embed  # the reference returns it as is


def test_interpolation_differs_from_timm_and_from_resize_by_size():
    ours_model = _tiny()
    timm_model = timm.models.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
        dynamic_img_size=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    timm_model.load_state_dict(ours_model.state_dict())
    with torch.no_grad():
        x16 = torch.randn(3, 3, 16, 16)
        assert torch.allclose(ours_model(x16), timm_model(x16), atol=1e-6)  # same net at native size
        x24 = torch.randn(3, 3, 24, 24)
        ref = ref_forward_tokens(ours_model, x24)[-1][:, 0]
        assert torch.allclose(ours_model(x24), ref, atol=1e-5)
        assert (timm_model(x24) - ref).abs().max() > 1e-2  # timm's own resampling is another function
    grid = ours_model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(6, 6), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 36, 32)
    assert (interpolate_pos_embed(ours_model.pos_embed, 6, 6)[:, 1:] - by_size).abs().max() > 1e-2


@pytest.mark.parametrize("hw", [(16, 16), (24, 24), (8, 12), (28, 16)])
def test_forward_equals_reference(hw):
    model = _tiny()
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        ref = ref_forward_tokens(model, x)
        assert model(x).shape == (3, 32)
        assert torch.allclose(model(x), ref[-1][:, 0], atol=1e-5)
        inter = model.get_intermediate_layers(x, n=2)
    assert len(inter) == 2
    for ours, theirs in zip(inter, ref):
        assert ours.shape == (3, 1 + (hw[0] // 4) * (hw[1] // 4), 32)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_intermediate_layers_n1_is_final_tokens():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        (last,) = model.get_intermediate_layers(x, n=1)
        assert torch.allclose(last[:, 0], model(x), atol=1e-6)
    with pytest.raises(ValueError, match="n must be in 1..2"):
        model.get_intermediate_layers(x, n=3)


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_last_selfattention_equals_manual(hw):
    model = _tiny()
    x = torch.randn(2, 3, *hw)
    n_tok = 1 + (hw[0] // 4) * (hw[1] // 4)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        sd = model.state_dict()
        tok = ref_prepare_tokens(sd, x, 4)
        tok = ref_block(sd, 0, tok, 2)
        manual = ref_block(sd, 1, tok, 2, return_attention=True)
        # the same matrix drives the block's (fused) attention output
        last = model.blocks[-1]
        y = last.norm1(model.blocks[0](model.prepare_tokens(x)))
        v = last.attn.qkv(y).reshape(2, n_tok, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        via_attn = last.attn.proj((attn @ v).transpose(1, 2).reshape(2, n_tok, 32))
        fused = last.attn(y)
    assert attn.shape == (2, 2, n_tok, n_tok)
    assert torch.allclose(attn, manual, atol=1e-6)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 2, n_tok), atol=1e-6)
    assert torch.allclose(via_attn, fused, atol=1e-5)
