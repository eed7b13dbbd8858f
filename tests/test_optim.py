"""Optimiser pieces against the reference's plain-loop formulations written here."""

import pytest
import torch
from torch import nn

from stages.dino.optim import LARS, clip_gradients_per_tensor, param_groups, set_schedules, build_optimizer
from stages.dino.teacher import copy_weights, ema_update


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_param_groups_exclude_biases_and_1d():
    model = small_model()
    regularized, plain = param_groups(model)
    assert [p.shape for p in regularized["params"]] == [(8, 4), (3, 8)]
    assert sorted(p.numel() for p in plain["params"]) == [3, 8, 8, 8]
    assert plain["weight_decay"] == 0.0


def test_set_schedules_leaves_unregularised_group_at_zero():
    opt = build_optimizer("adamw", param_groups(small_model()))
    set_schedules(opt, 0.1, 0.04)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]


def test_adamw_is_the_decoupled_adam_formula():
    """Our (fused) AdamW against Loshchilov & Hutter's update written out in float64, with the
    schedules changing lr and weight decay at every step; biases and norms are not decayed."""
    model = small_model()
    opt = build_optimizer("adamw", param_groups(model))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    state = {id(p): (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
                     torch.zeros_like(p, dtype=torch.float64)) for p in model.parameters()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step, (lr, wd) in enumerate([(1e-2, 0.04), (5e-3, 0.1), (2e-2, 0.4)], start=1):
        model(torch.randn(6, 4)).pow(2).sum().backward()
        set_schedules(opt, lr, wd)
        opt.step()
        for p in model.parameters():
            w, m, v = state[id(p)]
            g = p.grad.double()
            w.mul_(1 - lr * (wd if id(p) in decayed else 0.0))
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.sub_(lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps))
            torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-6)
        opt.zero_grad()


def reference_clip(model: nn.Module, clip: float) -> None:
    # main_dino / utils.clip_gradients: a Python loop with one host sync per tensor
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_per_tensor_clipping_matches_reference_loop(clip):
    model, other = small_model(), small_model()
    x = torch.randn(5, 4)
    for m in (model, other):
        m(x).pow(2).sum().mul(10).backward()
    clip_gradients_per_tensor(model, clip)
    reference_clip(other, clip)
    for a, b in zip(model.parameters(), other.parameters()):
        # clip * (1 / n) instead of clip / n: equal up to one rounding
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        assert a.grad.norm() <= clip * (1 + 1e-5)


def test_clipping_is_per_tensor_not_global():
    model = small_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients_per_tensor(model, 1.0)
    norms = [p.grad.norm().item() for p in model.parameters()]
    assert norms == pytest.approx([1.0] * len(norms), rel=1e-5)


def test_ema_matches_formula():
    student, teacher = small_model(), small_model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    expected = [0.99 * t.detach().clone() + 0.01 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.99)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    copy_weights(teacher, student)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_lars_trust_ratio_step():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    opt = LARS([{"params": [w]}, {"params": [b]}], lr=0.1, weight_decay=0.01, momentum=0.9)
    opt.step()
    update = w.grad + 0.01 * w0
    trust = 0.001 * w0.norm() / update.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * trust * update)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * b.grad)  # 1-D: no decay, no trust ratio


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="valid: adamw, sgd, lars"):
        build_optimizer("adam", param_groups(small_model()))
