"""The DINO projection head (paper Sec. 3.1, Fig. 2; reference `vision_transformer.DINOHead`) and the
small predictor MLP of the "Pred." ablation (paper Table 7, row 6).

The head is an MLP (in_dim -> hidden -> hidden -> bottleneck), an L2 normalisation, and a
weight-normalised linear layer without bias (bottleneck -> K prototypes). With `norm_last_layer`
the weight-norm gain g is fixed to 1, so every prototype row has unit norm and the logits are
cosine similarities in [-1, 1] (the reference's default, more stable for ViT-S).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

logger = logging.getLogger(__name__)

#: std of the truncated-normal initialisation of the MLP weights (reference `_init_weights`).
INIT_STD = 0.02


def _init_linear(module: nn.Module) -> None:
    """Reference initialisation: Linear weights ~ truncated normal (std 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _mlp(
    in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, use_bn: bool, act: type[nn.Module]
) -> nn.Module:
    """`nlayers` Linear layers; each hidden one followed by [BatchNorm1d] and `act`."""
    if nlayers == 1:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(act())
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head: MLP, L2 normalisation, weight-normalised prototypes.

    Defaults are the reference's (main_dino.py: out_dim 65536, 3 layers, hidden 2048, bottleneck
    256, no BN for ViTs, norm_last_layer True).

    Args:
        in_dim: D, the backbone feature size.
        out_dim: K, the number of prototypes (output logits).
        use_bn: BatchNorm1d after each hidden Linear (Linear-BN-GELU; the reference uses it only
            for ResNet-50).
        norm_last_layer: freeze the weight-norm gain g at 1 (`last_layer.parametrizations.weight
            .original0.requires_grad` is False).
        nlayers: number of Linear layers of the MLP (>= 1; 1 means one Linear(in_dim, bottleneck)).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the L2-normalised bottleneck.

    Shapes:
        forward: (N, in_dim) -> (N, out_dim).

    The last layer is `torch.nn.utils.parametrizations.weight_norm` of Linear(bottleneck, out_dim,
    bias=False): `original0` is g (out_dim, 1) and `original1` is v (out_dim, bottleneck), the
    weight is g * v / ||v|| row-wise. The reference uses the deprecated `nn.utils.weight_norm`, whose
    state-dict names are `last_layer.weight_g` / `weight_v`; `stages.dino.checkpoint` maps them.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim)):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn, nn.GELU)
        self.mlp.apply(_init_linear)
        # Default nn.Linear init for v, as the reference (its `apply` runs before the last layer).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad_(False)
        logger.debug(
            "DINOHead %d -> %d (nlayers=%d hidden=%d bottleneck=%d bn=%s norm_last_layer=%s)",
            in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim, use_bn, norm_last_layer,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) features -> (N, out_dim) float32 logits."""
        x = self.mlp(x)
        x = F.normalize(x.float(), p=2, dim=-1, eps=1e-12)
        # The last layer runs in fp32 even under autocast: the teacher's logits are divided by
        # 0.04, which would turn bf16's rounding (8-bit mantissa; the reference's fp16 has 11) into
        # ~5 % noise on its targets. K x bottleneck is a small share of a step's FLOPs.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x)


class DINOPredictor(nn.Module):
    """BYOL-style predictor on the student's head output (paper Table 7, row "Pred.").

    Our choice (the paper gives no details): the BYOL predictor shape, Linear(K, hidden) -
    BatchNorm1d - ReLU - Linear(hidden, K), applied to the student's logits only, so the output
    keeps the head's dimension K and the loss is unchanged. Weights are initialised as the head's
    MLP (truncated normal std 0.02, zero biases). Note its size, 2·K·hidden weights: 268M at the
    reference's K = 65536 and hidden 2048; use a smaller K for this ablation on small GPUs.

    Args:
        dim: K, the head's output size (input and output of the predictor).
        hidden_dim: width of the hidden layer.

    Shapes:
        forward: (N, dim) -> (N, dim).
    """

    def __init__(self, dim: int, hidden_dim: int = 2048) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"DINOPredictor: dim and hidden_dim must be >= 1, got {dim}, {hidden_dim}")
        self.mlp = _mlp(dim, hidden_dim, dim, nlayers=2, use_bn=True, act=nn.ReLU)
        self.mlp.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, dim)."""
        return self.mlp(x)


def build_predictor(dim: int, hidden_dim: int = 2048) -> DINOPredictor:
    """The predictor of the "Pred." ablation for a head with `dim` outputs (see DINOPredictor)."""
    return DINOPredictor(dim, hidden_dim)
