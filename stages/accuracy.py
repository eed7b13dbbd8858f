"""Top-1 / top-5 hit counts of a classifier's logits (linear and transfer evaluations)."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-min(5, C) hits) of one batch: logits (B, C), labels (B,)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, m)
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())
