"""DINOHead and the predictor of the "Pred." ablation, checked against hand-written numpy formulas."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from stages.dino.head import DINOHead, DINOPredictor, build_predictor

_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x·Φ(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _gain_and_v(head: DINOHead) -> tuple[torch.Tensor, torch.Tensor]:
    p = head.last_layer.parametrizations.weight
    return p.original0, p.original1


def _kinds(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module]


@pytest.mark.parametrize(
    "nlayers, use_bn, expected",
    [
        (3, False, ["Linear", "GELU", "Linear", "GELU", "Linear"]),
        (3, True, ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]),
        (2, False, ["Linear", "GELU", "Linear"]),
        (4, False, ["Linear", "GELU", "Linear", "GELU", "Linear", "GELU", "Linear"]),
    ],
)
def test_mlp_layout(nlayers: int, use_bn: bool, expected: list[str]) -> None:
    head = DINOHead(12, 20, use_bn=use_bn, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8)
    assert _kinds(head.mlp) == expected
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    dims = [(m.in_features, m.out_features) for m in linears]
    assert dims == [(12, 24)] + [(24, 24)] * (nlayers - 2) + [(24, 8)]
    assert head.last_layer.in_features == 8 and head.last_layer.out_features == 20
    assert head.last_layer.bias is None


def test_one_layer_is_a_single_linear_to_the_bottleneck() -> None:
    head = DINOHead(12, 20, use_bn=True, nlayers=1, hidden_dim=24, bottleneck_dim=8)
    assert isinstance(head.mlp, nn.Linear)
    assert (head.mlp.in_features, head.mlp.out_features) == (12, 8)


def test_reference_defaults() -> None:
    head = DINOHead(384, 65536)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    gain, v = _gain_and_v(head)
    assert tuple(gain.shape) == (65536, 1) and tuple(v.shape) == (65536, 256)
    assert not gain.requires_grad


def test_initialisation() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 16, nlayers=3, hidden_dim=512, bottleneck_dim=128)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            w = _np(m.weight)
            assert abs(w.std() - 0.02) < 0.002
            assert abs(w.mean()) < 0.002
            assert np.abs(w).max() <= 2.0  # trunc_normal_'s absolute bounds
            assert np.all(_np(m.bias) == 0)
    gain, _ = _gain_and_v(head)
    assert torch.all(gain == 1)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_gain_frozen_only_with_norm_last_layer(norm_last_layer: bool) -> None:
    head = DINOHead(10, 7, norm_last_layer=norm_last_layer, hidden_dim=16, bottleneck_dim=6)
    gain, v = _gain_and_v(head)
    assert gain.requires_grad is (not norm_last_layer)
    assert v.requires_grad
    head(torch.randn(5, 10)).square().sum().backward()
    assert (gain.grad is None) is norm_last_layer
    assert v.grad is not None and torch.any(v.grad != 0)


@pytest.mark.parametrize("nlayers, use_bn", [(3, False), (1, False), (2, True)])
def test_forward_matches_hand_formula(nlayers: int, use_bn: bool) -> None:
    torch.manual_seed(1)
    head = DINOHead(9, 11, use_bn=use_bn, norm_last_layer=False, nlayers=nlayers,
                    hidden_dim=13, bottleneck_dim=5).eval()
    gain, v = _gain_and_v(head)
    with torch.no_grad():  # a non-trivial gain and BN statistics so the formula is really exercised
        gain.copy_(torch.rand_like(gain) + 0.5)
        for m in head.mlp.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 9)

    h = _np(x)
    modules = [head.mlp] if isinstance(head.mlp, nn.Linear) else list(head.mlp)
    for m in modules:
        if isinstance(m, nn.Linear):
            h = h @ _np(m.weight).T + _np(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            h = (h - _np(m.running_mean)) / np.sqrt(_np(m.running_var) + m.eps) * _np(m.weight) + _np(m.bias)
        else:
            h = _gelu(h)
    z = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    v_np = _np(v)
    w = _np(gain) * v_np / np.linalg.norm(v_np, axis=1, keepdims=True)  # w_k = g_k v_k / ||v_k||
    expected = z @ w.T

    got = head(x)
    assert got.shape == (6, 11)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(head.last_layer.weight), w, rtol=1e-6, atol=1e-7)


def test_normalised_last_layer_gives_cosine_logits() -> None:
    torch.manual_seed(2)
    head = DINOHead(8, 30, hidden_dim=16, bottleneck_dim=4)
    out = head(100 * torch.randn(50, 8))
    assert out.abs().max() <= 1 + 1e-5
    np.testing.assert_allclose(_np(head.last_layer.weight.norm(dim=1)), np.ones(30), rtol=1e-6)


def test_last_layer_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(3)
    head = DINOHead(8, 30, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        bottleneck = head.mlp(x)
    assert bottleneck.dtype == torch.bfloat16 and out.dtype == torch.float32
    # the bf16 MLP's output, normalised, times the fp32 weight-normed matrix, in float64 here
    z = _np(bottleneck.float())
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    gain, v = _gain_and_v(head)
    weight = _np(gain) * _np(v) / np.linalg.norm(_np(v), axis=1, keepdims=True)
    np.testing.assert_allclose(_np(out), z @ weight.T, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_and_deepcopy() -> None:
    head = DINOHead(8, 30, hidden_dim=16, bottleneck_dim=4)
    keys = set(head.state_dict())
    assert {"last_layer.parametrizations.weight.original0",
            "last_layer.parametrizations.weight.original1", "mlp.0.weight", "mlp.4.bias"} <= keys
    teacher = copy.deepcopy(head)  # the teacher is built this way
    x = torch.randn(3, 8)
    torch.testing.assert_close(teacher(x), head(x))
    with torch.no_grad():
        _gain_and_v(teacher)[1].mul_(2).add_(1)
    assert not torch.allclose(teacher(x), head(x))


@pytest.mark.parametrize("bad", [dict(nlayers=0), dict(out_dim=0), dict(bottleneck_dim=0)])
def test_rejects_bad_sizes(bad: dict) -> None:
    kwargs = dict(in_dim=4, out_dim=5) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        DINOHead(**kwargs)


def test_predictor_keeps_dimension_and_matches_formula() -> None:
    torch.manual_seed(3)
    pred = build_predictor(12, hidden_dim=7)
    assert isinstance(pred, DINOPredictor)
    assert _kinds(pred.mlp) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    x = torch.randn(10, 12)
    pred.train()
    got = pred(x)
    assert got.shape == (10, 12)
    lin1, bn, _, lin2 = list(pred.mlp)
    h = _np(x) @ _np(lin1.weight).T + _np(lin1.bias)
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.eps)  # training-mode BN: batch statistics, biased var
    h = np.maximum(h, 0)
    np.testing.assert_allclose(_np(got), h @ _np(lin2.weight).T + _np(lin2.bias), rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for p in pred.parameters())
