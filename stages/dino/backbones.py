"""DINO backbones: the reference's ViTs (on timm's VisionTransformer) and torchvision's ResNet-50.

The ViTs match facebookresearch/dino `vision_transformer.py` (Caron et al. 2021): patch embedding,
a CLS token, learned absolute position embeddings, pre-norm blocks with qkv bias and MLP ratio 4,
LayerNorm eps 1e-6, a final norm and no classifier; a backbone called on images returns the
final-norm CLS token. Their state dict keys are the reference's (`cls_token`, `pos_embed`,
`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ..., `norm.weight`), so the published
checkpoints load without renaming (see `stages.dino.checkpoint`).

Position embeddings are resized to the input's patch grid with the reference's own bicubic
interpolation (`interpolate_pos_embed`), not timm's `resample_abs_pos_embed`: the two differ (the
reference passes a `scale_factor` of (grid + 0.1) / sqrt(N), timm a target size), and features of
a reference checkpoint at 96² or 480² would otherwise drift from the published ones.

Stochastic depth (`drop_path_rate`, linearly increasing over the blocks as in the reference) is
the student's only: the caller builds the teacher with `drop_path_rate=0.0`, as main_dino.py does.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torchvision
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from stages.params import VIT_SIZES, Model

logger = logging.getLogger(__name__)

Arch = Literal["vit_tiny", "vit_small", "vit_base", "resnet50"]

ARCHS: tuple[str, ...] = (*VIT_SIZES, "resnet50")
RESNET_DIM = 2048


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a [CLS]+patch position embedding to a patch grid, exactly as the DINO reference.

    The reference (`VisionTransformer.interpolate_pos_encoding`) returns the embedding unchanged when
    the input has N patches on a square grid; otherwise it reshapes the patch part to its
    sqrt(N) x sqrt(N) grid and calls `F.interpolate(..., scale_factor=((h0 + 0.1) / sqrt(N),
    (w0 + 0.1) / sqrt(N)), mode="bicubic")` (no `size`, no antialias, align_corners False), where
    h0/w0 are the input's patch rows/columns. (The reference names them w0/h0 because it unpacks
    `B, nc, w, h = x.shape`; its first scale factor is the height's.) The +0.1 avoids a floor
    rounding one patch short (facebookresearch/dino issue 8).

    Args:
        pos_embed: (1, 1 + N, D) with N a square number; index 0 is the CLS token's.
        grid_h: patch rows of the input (H // patch_size).
        grid_w: patch columns of the input (W // patch_size).

    Returns:
        (1, 1 + grid_h * grid_w, D); `pos_embed` itself when no resizing is needed.

    Raises:
        ValueError: N is not a square number or the grid is empty.
    """
    num_patches = pos_embed.shape[1] - 1
    if num_patches == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {grid_h}x{grid_w}")
    dim = pos_embed.shape[-1]
    class_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = nn.functional.interpolate(
        patch_pos,
        scale_factor=((grid_h + 0.1) / math.sqrt(num_patches), (grid_w + 0.1) / math.sqrt(num_patches)),
        mode="bicubic",
    )
    if tuple(patch_pos.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(
            f"bicubic interpolation gave a {tuple(patch_pos.shape[-2:])} grid, expected {(grid_h, grid_w)}"
        )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((class_pos, patch_pos), dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm's VisionTransformer configured and extended as the DINO reference's ViT.

    Accepts images of any size whose sides are multiples of `patch_size`; the position embedding
    is interpolated as the reference does (`interpolate_pos_embed`).

    Attributes:
        embed_dim: feature dimension D of the CLS output.
        patch_size: side of the square patches, in pixels.
    """

    def __init__(
        self,
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        drop_path_rate: float = 0.0,
    ) -> None:
        """Build the ViT.

        Args:
            patch_size: patch side in pixels.
            img_size: the training image size; fixes the stored position-embedding grid
                (img_size // patch_size)².
            in_chans: image channels.
            embed_dim: token dimension.
            depth: number of transformer blocks.
            num_heads: attention heads per block; must divide `embed_dim`.
            drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        """
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            class_token=True,
            dynamic_img_size=True,  # patch embed returns NHWC so `_pos_embed` sees the grid
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.patch_size = patch_size
        # timm draws the CLS token from N(0, 1e-6); the reference from a truncated N(0, 0.02)
        # like the position embedding (Linear layers: trunc normal 0.02, zero bias, in both).
        trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the CLS token and add the (reference-interpolated) position embedding.

        Args:
            x: patch embeddings (B, H/p, W/p, D), as the patch embedding returns them.

        Returns:
            (B, 1 + N, D) tokens, N = (H/p)(W/p).
        """
        if x.ndim != 4:
            raise ValueError(f"expected patch embeddings (B, H, W, D), got shape {tuple(x.shape)}")
        batch, grid_h, grid_w, dim = x.shape
        pos_embed = interpolate_pos_embed(self.pos_embed, grid_h, grid_w)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, grid_h * grid_w, dim)), dim=1)
        return self.pos_drop(x + pos_embed)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={self.patch_size}")

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the first block's input tokens (B, 1 + N, D)."""
        self._check_images(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), H and W multiples of patch_size -> final-norm CLS token (B, D)."""
        self._check_images(x)
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:  # type: ignore[override]
        """The tokens after each of the last `n` blocks, each through the final norm (reference).

        Args:
            x: images (B, C, H, W).
            n: how many of the last blocks, 1 <= n <= depth.

        Returns:
            n tensors (B, 1 + N, D), earliest block first.
        """
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in 1..{len(self.blocks)}, got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention weights softmax(q kᵀ · scale), formed explicitly.

        timm's fused attention never materialises this matrix, so it is recomputed here from the
        last block's own qkv projection on its pre-norm input (as the reference's `Attention`
        returns it).

        Args:
            x: images (B, C, H, W).

        Returns:
            (B, heads, 1 + N, 1 + N); each row sums to 1; row/column 0 is the CLS token.
        """
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn
        y = last.norm1(x)
        batch, tokens, _ = y.shape
        qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _build_resnet50(in_chans: int) -> nn.Module:
    """torchvision ResNet-50 (random init) with `fc` replaced by Identity: images -> (B, 2048)."""
    model = torchvision.models.resnet50(weights=None)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.fc = nn.Identity()
    model.embed_dim = RESNET_DIM
    return model


def build_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> nn.Module:
    """Build a randomly initialised backbone by the reference's architecture name.

    Args:
        arch: "vit_tiny" (192 dims, 3 heads), "vit_small" (384, 6), "vit_base" (768, 12) — all
            depth 12 — or "resnet50" (torchvision, 2048-d output).
        patch_size: ViT patch side (ignored by resnet50).
        img_size: ViT training image size; sets the stored position-embedding grid.
        in_chans: image channels.
        drop_path_rate: stochastic depth; the student's only (pass 0.0 for the teacher). Ignored
            by resnet50, as in the reference.
        embed_dim: overrides the named ViT's width (tiny CPU models); None keeps the reference's.
        depth: overrides the named ViT's number of blocks.
        num_heads: overrides the named ViT's heads.

    Returns:
        A module mapping images (B, C, H, W) to features (B, embed_dim), with attribute
        `embed_dim` (and `patch_size` for ViTs).

    Raises:
        ValueError: unknown arch (the message lists the valid names), overrides given for
            resnet50, or num_heads not dividing embed_dim.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}. Valid architectures are: {', '.join(ARCHS)}")
    if arch == "resnet50":
        overrides = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ValueError(f"resnet50 has a fixed size; {', '.join(given)} only apply to ViTs")
        if drop_path_rate:
            logger.info("resnet50: drop_path_rate=%s ignored (ViTs only, as in the reference)", drop_path_rate)
        return _build_resnet50(in_chans)
    ref_dim, ref_depth, ref_heads = VIT_SIZES[arch]
    dim = ref_dim if embed_dim is None else embed_dim
    blocks = ref_depth if depth is None else depth
    heads = ref_heads if num_heads is None else num_heads
    if dim % heads:
        raise ValueError(f"{arch}: num_heads={heads} must divide embed_dim={dim}")
    if img_size % patch_size:
        raise ValueError(f"{arch}: img_size={img_size} must be a multiple of patch_size={patch_size}")
    return DinoVisionTransformer(
        patch_size=patch_size,
        img_size=img_size,
        in_chans=in_chans,
        embed_dim=dim,
        depth=blocks,
        num_heads=heads,
        drop_path_rate=drop_path_rate,
    )


def backbone_kwargs(model_params: Model) -> dict[str, int]:
    """`build_backbone` keyword arguments of the `model` section of params.yaml, beside arch and
    patch_size: img_size and in_chans, and the ViT size overrides that are set (not None).

    Args:
        model_params: the validated `stages.params.Model` section.

    Returns:
        ``{"img_size", "in_chans"}`` plus those of ``{"embed_dim", "depth", "num_heads"}`` that are
        not None.
    """
    kwargs = {"img_size": model_params.img_size, "in_chans": model_params.in_chans}
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(model_params, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def build_backbone_from_params(model_params: Model, drop_path_rate: float | None = None) -> nn.Module:
    """Build the backbone described by the `model` section of params.yaml.

    Args:
        model_params: the validated `stages.params.Model` section.
        drop_path_rate: None takes `model_params.drop_path_rate` (the student's); pass 0.0 for the
            teacher, which the reference builds without stochastic depth.

    Returns:
        The backbone, as `build_backbone` returns it.
    """
    return build_backbone(
        model_params.arch,
        patch_size=model_params.patch_size,
        drop_path_rate=model_params.drop_path_rate if drop_path_rate is None else drop_path_rate,
        **backbone_kwargs(model_params),
    )
