"""Optimiser pieces of DINO training, with the reference's semantics and no host synchronisation.

- Weight decay applies to weights only: biases and every 1-D parameter (norms, tokens' gains) are
  excluded (reference `get_params_groups`).
- Gradient clipping is per parameter tensor: each tensor's gradient norm is capped at `clip` on its
  own (reference `clip_gradients`), not the global norm. Computed with foreach kernels and a clamp
  instead of a Python `if` on `.item()`, which gives the same numbers without a sync per tensor.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: regularised weights first, then biases and 1-D parameters (weight_decay 0)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the reference uses it for ResNet-50: SGD with momentum whose
    update is scaled by the trust ratio ||w|| / ||update|| for weights; 1-D parameters skip both
    weight decay and the trust ratio."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer API
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(name: Literal["adamw", "sgd", "lars"], groups: list[dict]) -> torch.optim.Optimizer:
    """lr and weight decay are set by the schedules at every step, so they start at 0 here.
    AdamW is fused on every device: one kernel per tensor instead of six, and no Python loop
    (on 2 CPU cores 0.8-1.4 ms per step of an 0.86M-parameter student against 5.6 single-tensor)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}; valid: adamw, sgd, lars")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this run's implementation flags (fused, foreach,
    capturable): the saved run may have trained on another device or with CUDA graphs."""
    flags = [{key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this iteration's lr on every group and weight decay on the regularised group only."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if index == 0:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_tensor(model: nn.Module, clip: float) -> None:
    """Scale each parameter's gradient so that its own L2 norm is at most `clip`.

    Same arithmetic as the reference: coef = clip / (norm + 1e-6), applied only when below 1.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or clip <= 0:
        return
    coefs = torch._foreach_norm(grads)
    torch._foreach_add_(coefs, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)


def cancel_last_layer_gradients(head_last_layer: nn.Module) -> None:
    """Drop the head's last-layer gradients (first `freeze_last_layer` epochs; reference)."""
    for param in head_last_layer.parameters():
        param.grad = None
