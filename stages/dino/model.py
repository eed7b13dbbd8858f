"""Backbone + projection head applied to a list of multi-crop views."""

from __future__ import annotations

import torch
from torch import nn


class MultiCropModel(nn.Module):
    """Runs the backbone once per group of same-resolution crops (global crops together, local
    crops together, as the reference's MultiCropWrapper) and the head once on all CLS features.

    Args:
        backbone: images (B, C, H, W) -> (B, D).
        head: (N, D) -> (N, K).
        predictor: optional (N, K) -> (N, K) MLP on the student's output (Table 7 ablation).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.predictor = predictor

    def forward(
        self, crops: list[torch.Tensor] | torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """crops: list of (B, C, H_i, W_i); returns (len(crops)·B, K) in crop order, and with
        return_features also the backbone's (len(crops)·B, D) features the head took."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(features)
        output = self.head(features)
        if self.predictor is not None:
            output = self.predictor(output)
        return (output, features) if return_features else output
