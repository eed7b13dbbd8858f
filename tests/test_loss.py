"""DINOLoss against hand-written loops over crop pairs (paper Eq. 3 and Eq. 4, Algorithm 1), its
ablation variants, diagnostics, and the center update with and without torch.distributed."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.dino.loss import DINOLoss, sinkhorn_knopp


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def _expected_teacher_temp(warm: float, final: float, warm_epochs: int, epoch: int) -> float:
    if epoch >= warm_epochs:
        return final
    return warm + (final - warm) * (epoch / (warm_epochs - 1) if warm_epochs > 1 else 0.0)


def _sinkhorn_loop(t: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp on one process, with explicit loops over rows and columns."""
    q = np.exp(t / temp).T  # (K, B)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(b):
            q[:, c] = q[:, c] / q[:, c].sum() / b
    return (q * b).T


def _teacher_targets(t: np.ndarray, center: np.ndarray, temp: float, mode: str, n_global: int) -> np.ndarray:
    if mode == "centering":
        return np.stack([_softmax((row - center) / temp) for row in t])
    if mode == "softmax":
        return np.stack([_softmax(row / temp) for row in t])
    return np.concatenate([_sinkhorn_loop(v, temp, 3) for v in np.split(t, n_global)])


def _eq3_loop(s, t, center, ncrops, n_global, tau_s, tau_t, mode="centering", loss="ce") -> float:
    """Eq. 3: Σ over teacher views i and student views v != i of the batch mean of H(Pt_i, Ps_v),
    divided by the number of pairs (the reference's averaging)."""
    batch = len(s) // ncrops
    p = _teacher_targets(t, center, tau_t, mode, n_global)
    total, n_pairs = 0.0, 0
    for i in range(n_global):
        for v in range(ncrops):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                pt = p[i * batch + b]
                log_ps = _log_softmax(s[v * batch + b] / tau_s)
                if loss == "ce":
                    pair += -np.sum(pt * log_ps)
                else:
                    ps = np.exp(log_ps)
                    pair += np.sum((ps / np.linalg.norm(ps) - pt / np.linalg.norm(pt)) ** 2)
            total += pair / batch
            n_pairs += 1
    return total / n_pairs


def _data(ncrops: int, n_global: int, batch: int, k: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(ncrops * batch, k, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n_global * batch, k, generator=g, dtype=torch.float64)
    return s.float(), t.float()


GRID = [
    # ncrops, n_global, batch, K, warm τt, τt, warm epochs, nepochs, epoch, τs
    (2, 2, 3, 16, 0.04, 0.04, 0, 5, 0, 0.1),
    (4, 2, 1, 8, 0.04, 0.07, 3, 6, 0, 0.1),
    (4, 2, 5, 8, 0.04, 0.07, 3, 6, 1, 0.1),
    (10, 2, 2, 32, 0.04, 0.07, 3, 6, 2, 0.1),
    (10, 2, 3, 32, 0.04, 0.07, 3, 6, 5, 0.1),
    (6, 1, 4, 12, 0.02, 0.06, 2, 4, 1, 0.2),
    (3, 1, 2, 20, 0.05, 0.05, 0, 2, 1, 0.05),
]


@pytest.mark.parametrize("ncrops, n_global, batch, k, warm, temp, warm_ep, nep, epoch, tau_s", GRID)
def test_ce_matches_eq3_loop(ncrops, n_global, batch, k, warm, temp, warm_ep, nep, epoch, tau_s) -> None:
    loss_fn = DINOLoss(k, ncrops, warm, temp, warm_ep, nep, student_temp=tau_s)
    c0 = torch.randn(1, k, generator=torch.Generator().manual_seed(7)) * 0.3
    loss_fn.center.copy_(c0)
    s, t = _data(ncrops, n_global, batch, k, seed=ncrops * 100 + batch)
    tau_t = _expected_teacher_temp(warm, temp, warm_ep, epoch)
    expected = _eq3_loop(s.double().numpy(), t.double().numpy(), c0.double().numpy()[0], ncrops, n_global,
                         tau_s, tau_t)
    got = loss_fn(s, t, epoch)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert math.isclose(got.item(), expected, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(loss_fn.last_stats["teacher_temp"].item(), tau_t, rel_tol=1e-6)
    # Eq. 4: the center moved towards this batch's teacher mean, after the loss used the old one.
    np.testing.assert_allclose(
        loss_fn.center.numpy(), 0.9 * c0.numpy() + 0.1 * t.numpy().mean(0, keepdims=True), rtol=1e-5, atol=1e-6
    )


def test_student_gradient_matches_closed_form() -> None:
    ncrops, n_global, batch, k, tau_s, tau_t = 4, 2, 3, 6, 0.1, 0.04
    s, t = _data(ncrops, n_global, batch, k, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss_fn = DINOLoss(k, ncrops, tau_t, tau_t, 0, 1, student_temp=tau_s)
    loss_fn(s, t, 0).backward()
    assert t.grad is None  # the teacher is a target only (stop-gradient)
    # dL/ds_v = Σ_{i != v} (q_v − p_i) / (τs · B · n_pairs)
    sv = s.detach().double().numpy().reshape(ncrops, batch, k)
    q = np.stack([[_softmax(r / tau_s) for r in view] for view in sv])
    p = np.stack([[_softmax(r / tau_t) for r in view] for view in t.detach().double().numpy().reshape(2, batch, k)])
    n_pairs = n_global * (ncrops - 1)
    grad = np.zeros_like(q)
    for v in range(ncrops):
        for i in range(n_global):
            if i != v:
                grad[v] += (q[v] - p[i]) / (tau_s * batch * n_pairs)
    np.testing.assert_allclose(s.grad.numpy().reshape(ncrops, batch, k), grad, rtol=1e-4, atol=1e-7)


def test_center_sequence_matches_numpy_ema() -> None:
    k, m = 5, 0.7
    loss_fn = DINOLoss(k, 2, 0.04, 0.04, 0, 3, center_momentum=m)
    assert loss_fn.center.shape == (1, k) and torch.all(loss_fn.center == 0)
    assert "center" in dict(loss_fn.named_buffers())
    expected = np.zeros((1, k))
    for step in range(3):
        s, t = _data(2, 2, 4, k, seed=step)
        loss_fn(s, t, step)
        expected = expected * m + t.double().numpy().mean(0, keepdims=True) * (1 - m)
    np.testing.assert_allclose(loss_fn.center.double().numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["centering", "softmax", "sinkhorn"])
@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
def test_variants_match_loop(mode: str, loss_kind: str) -> None:
    ncrops, n_global, batch, k, tau_t = 5, 2, 4, 7, 0.05
    loss_fn = DINOLoss(k, ncrops, tau_t, tau_t, 0, 1, teacher_output=mode, loss=loss_kind)
    c0 = torch.linspace(-0.5, 0.5, k)[None]
    loss_fn.center.copy_(c0)  # used by "centering" only
    s, t = _data(ncrops, n_global, batch, k, seed=11)
    expected = _eq3_loop(s.double().numpy(), t.double().numpy(), c0.double().numpy()[0], ncrops, n_global,
                         0.1, tau_t, mode=mode, loss=loss_kind)
    got = loss_fn(s, t, 0)
    assert math.isclose(got.item(), expected, rel_tol=1e-4, abs_tol=1e-6)
    # the center is tracked in every mode
    np.testing.assert_allclose(loss_fn.center.numpy(), 0.9 * c0.numpy() + 0.1 * t.numpy().mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-6)


def test_mse_is_zero_when_student_equals_targets() -> None:
    """MSE on normalised probabilities: a student whose Ps equals the softmax teacher's Pt has loss 0."""
    k, batch = 6, 3
    t = torch.randn(batch, k)
    s = torch.cat([t, t])  # 2 crops, same logits; τs == τt makes Ps == Pt
    loss_fn = DINOLoss(k, 2, 0.1, 0.1, 0, 1, student_temp=0.1, teacher_output="softmax", loss="mse")
    assert loss_fn(s, torch.cat([t, t]), 0).item() < 1e-10


def test_sinkhorn_marginals() -> None:
    torch.manual_seed(0)
    batch, k = 12, 5
    logits = torch.randn(batch, k)
    q3 = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    np.testing.assert_allclose(q3.double().numpy(), _sinkhorn_loop(logits.double().numpy(), 0.5, 3), rtol=1e-5)
    np.testing.assert_allclose(q3.sum(1).numpy(), np.ones(batch), rtol=1e-5)  # each sample: a distribution
    q = sinkhorn_knopp(logits, 0.5, n_iterations=50)
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(batch), rtol=1e-5)
    np.testing.assert_allclose(q.sum(0).numpy(), np.full(k, batch / k), rtol=1e-4)  # equipartition
    # a constant shift of the logits changes nothing; huge logits do not overflow
    torch.testing.assert_close(sinkhorn_knopp(logits + 1000.0, 0.5), q3, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(sinkhorn_knopp(logits * 1e4, 0.04)).all()


def test_diagnostics() -> None:
    ncrops, n_global, batch, k, tau_t = 4, 2, 3, 9, 0.07
    s, t = _data(ncrops, n_global, batch, k, seed=5)
    loss_fn = DINOLoss(k, ncrops, tau_t, tau_t, 0, 1)
    loss = loss_fn(s, t, 0)
    st = loss_fn.last_stats
    assert all(not v.requires_grad and v.dim() == 0 for v in st.values())
    sd, td = s.double().numpy(), t.double().numpy()
    p = np.stack([_softmax(r / tau_t) for r in td])
    lq = np.stack([_log_softmax(r / 0.1) for r in sd])
    ent = lambda x: -np.sum(x * np.log(x), axis=-1)  # noqa: E731
    assert math.isclose(st["teacher_entropy"].item(), ent(p).mean(), rel_tol=1e-4)
    assert math.isclose(st["teacher_batch_entropy"].item(), ent(p.mean(0)), rel_tol=1e-5)
    assert math.isclose(st["student_entropy"].item(), ent(np.exp(lq)).mean(), rel_tol=1e-4)
    kls = [np.sum(p[i * batch + b] * (np.log(p[i * batch + b]) - lq[v * batch + b]))
           for i in range(n_global) for v in range(ncrops) if v != i for b in range(batch)]
    assert math.isclose(st["kl"].item(), float(np.mean(kls)), rel_tol=1e-4)
    # CE = KL + H(Pt) when every teacher view pairs with the same number of student views
    assert math.isclose(loss.item(), st["kl"].item() + st["teacher_entropy"].item(), rel_tol=1e-4)


def test_collapsed_teacher_diagnostics() -> None:
    """A constant teacher (collapse to uniform after centering) has entropy log K."""
    k = 16
    loss_fn = DINOLoss(k, 2, 0.04, 0.04, 0, 1, center_momentum=0.0)
    t = torch.randn(1, k).repeat(8, 1)
    loss_fn(torch.randn(8, k), t, 0)  # center <- mean of t, i.e. t itself
    loss_fn(torch.randn(8, k), t, 0)
    assert math.isclose(loss_fn.last_stats["teacher_entropy"].item(), math.log(k), rel_tol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher_output="sharpen"), "teacher_output"),
        (dict(loss="l1"), "loss"),
        (dict(ncrops=1), "ncrops"),
        (dict(warmup_teacher_temp_epochs=9), "warmup_teacher_temp_epochs"),
        (dict(student_temp=0.0), "temperatures"),
    ],
)
def test_constructor_rejects(kwargs: dict, match: str) -> None:
    args = dict(out_dim=4, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04,
                warmup_teacher_temp_epochs=0, nepochs=3) | kwargs
    with pytest.raises(ValueError, match=match):
        DINOLoss(**args)


def test_forward_rejects_bad_shapes_and_epochs() -> None:
    loss_fn = DINOLoss(4, 4, 0.04, 0.04, 0, 3)
    with pytest.raises(ValueError, match="ncrops"):
        loss_fn(torch.randn(10, 4), torch.randn(4, 4), 0)
    with pytest.raises(ValueError, match="global views"):
        loss_fn(torch.randn(8, 4), torch.randn(6, 4), 0)
    with pytest.raises(ValueError, match="columns"):
        loss_fn(torch.randn(8, 5), torch.randn(4, 5), 0)
    with pytest.raises(ValueError, match="epoch 3"):
        loss_fn(torch.randn(8, 4), torch.randn(4, 4), 3)
    assert torch.all(loss_fn.center == 0)  # nothing was updated by refused calls


def test_runs_without_process_group() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    loss_fn = DINOLoss(8, 3, 0.04, 0.04, 0, 1, teacher_output="sinkhorn")
    s, t = _data(3, 2, 2, 8, seed=1)
    assert torch.isfinite(loss_fn(s, t, 0))


# --- two processes, gloo -------------------------------------------------------------------------

WORLD = 2
K, NCROPS, BATCH = 6, 4, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        s, t = _data(NCROPS, 2, BATCH, K, seed=100 + rank, scale=3.0)
        results = {"t": t}
        for mode in ("centering", "sinkhorn"):
            loss_fn = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 1, center_momentum=0.8, teacher_output=mode)
            results[f"loss_{mode}"] = loss_fn(s, t, 0).detach()
            results[f"center_{mode}"] = loss_fn.center.clone()
            results[f"probs_{mode}"] = loss_fn.teacher_probs(t, 0.04, 2)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_process_center_and_sinkhorn(tmp_path: Path) -> None:
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can hang.
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(WORLD)]
    t_all = torch.cat([r[0]["t"], r[1]["t"]]).double().numpy()
    expected_center = 0.2 * t_all.mean(0, keepdims=True)  # mean over both ranks' 2·B rows each
    for mode in ("centering", "sinkhorn"):
        for i in range(WORLD):
            np.testing.assert_allclose(r[i][f"center_{mode}"].double().numpy(), expected_center, rtol=1e-5, atol=1e-7)
    # Sinkhorn over ranks equals Sinkhorn of one process holding both ranks' rows, per global view.
    for view in range(2):
        rows = slice(view * BATCH, (view + 1) * BATCH)
        joint = _sinkhorn_loop(np.concatenate([r[0]["t"][rows].double().numpy(), r[1]["t"][rows].double().numpy()]),
                               0.04, 3)
        got = np.concatenate([r[0]["probs_sinkhorn"][rows].double().numpy(), r[1]["probs_sinkhorn"][rows].double().numpy()])
        np.testing.assert_allclose(got, joint, rtol=1e-4, atol=1e-7)
    # each rank's loss is its local Eq. 3 with the shared (initial, zero) center
    for i in range(WORLD):
        s, t = _data(NCROPS, 2, BATCH, K, seed=100 + i, scale=3.0)
        expected = _eq3_loop(s.double().numpy(), t.double().numpy(), np.zeros(K), NCROPS, 2, 0.1, 0.04)
        assert math.isclose(r[i]["loss_centering"].item(), expected, rel_tol=1e-5)
