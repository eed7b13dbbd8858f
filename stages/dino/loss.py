"""The DINO self-distillation loss (paper Sec. 3.1, Eq. 3 and Algorithm 1; reference `DINOLoss`),
with the teacher-output and loss variants of the paper's ablations (Table 7: "SK", "MSE").

    min_θs  Σ_{x ∈ {x1g, x2g}}  Σ_{x' ∈ V, x' ≠ x}  H(Pt(x), Ps(x'))            (Eq. 3)

with Ps = softmax(gs / τs) over the K outputs and Pt = softmax((gt − c) / τt), c an EMA of the
teacher's batch means (Eq. 4, "centering") and τt small ("sharpening"). The sum is averaged over the
pairs and over the batch, as the reference.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stages.dino.schedules import teacher_temp_schedule

logger = logging.getLogger(__name__)

TeacherOutput = Literal["centering", "softmax", "sinkhorn"]
LossKind = Literal["ce", "mse"]
TEACHER_OUTPUTS: tuple[str, ...] = ("centering", "softmax", "sinkhorn")
LOSSES: tuple[str, ...] = ("ce", "mse")


def _distributed() -> bool:
    """True when collectives can run: torch.distributed available AND a process group initialised."""
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_reduce(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType | None" = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) when distributed; the identity otherwise."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def _logsumexp_over_batch(log_q: torch.Tensor) -> torch.Tensor:
    """(K, B) -> (K, 1) log Σ_b exp(log_q) over the batch of every rank (max-shifted, exact)."""
    peak = log_q.max(dim=1, keepdim=True).values
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = _all_reduce(torch.exp(log_q - peak).sum(dim=1, keepdim=True))
    return peak + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float | torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignments over the (global) batch, as SwAV's `distributed_sinkhorn`.

    Q = exp(logits / temperature)ᵀ (K × B); `n_iterations` times its rows (prototypes) are scaled to
    sum 1/K over the whole batch (all ranks) and its columns (samples) to sum 1/B_total; finally it
    is multiplied by B_total, so every sample's row of the result sums to 1. Sums over the batch are
    all-reduced when torch.distributed is initialised, so the result equals that of one process
    holding the concatenated batch.

    Deviation from SwAV's code, same mathematics: the iterations run in the log domain (SwAV's
    initial division by the total is a constant that the first row scaling cancels), so a
    temperature of 0.04 on unbounded logits neither overflows nor underflows a whole prototype row
    to 0 (which would give NaN in SwAV's float32 version).

    Args:
        logits: (B, K) teacher outputs of one view on this rank.
        temperature: τt, SwAV's ε.
        n_iterations: SwAV's default 3.

    Returns:
        (B, K) float32 assignments; each row sums to 1.
    """
    log_q = (logits.float() / temperature).t()  # (K, B)
    n_protos = log_q.shape[0]
    n_samples = log_q.shape[1] * _world_size()
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_batch(log_q) - math.log(n_protos)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(n_samples)
    return torch.exp(log_q + math.log(n_samples)).t()


def _pair_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_i Σ_{v ≠ i} Σ_{b,k} a[i] · b[v] for a (G, B, K) and b (V, B, K), G <= V; a 0-dim tensor."""
    n_global = a.shape[0]
    return (a.sum(0) * b.sum(0)).sum() - (a * b[:n_global]).sum()


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher and the student over crop pairs.

    Defaults are the reference's (main_dino.py: τs 0.1, center momentum 0.9, τt 0.04, no τt
    warm-up); the ablation switches default to DINO itself.

    Args:
        out_dim: K, the head's output size; `center` is a (1, K) buffer of zeros.
        ncrops: total number of crops per image (global + local), e.g. 2 + 8 = 10.
        warmup_teacher_temp: τt at epoch 0.
        teacher_temp: τt after the warm-up.
        warmup_teacher_temp_epochs: epochs of linear τt warm-up.
        nepochs: training epochs (length of the τt schedule).
        student_temp: τs.
        center_momentum: m of the center EMA, c <- m·c + (1 − m)·mean(teacher batch) (Eq. 4).
        teacher_output: how teacher logits become targets (Table 7): "centering" (DINO:
            softmax((t − c)/τt)), "softmax" (sharpening only: softmax(t/τt), no centering) or
            "sinkhorn" (Sinkhorn-Knopp over the batch on exp(t/τt), 3 iterations, per global view,
            as SwAV). The center is updated in every mode (cheap, and kept as a diagnostic).
        loss: "ce" (Eq. 3) or "mse". Our reading of the paper's "MSE" row (Table 7): the same
            targets and pairs as "ce", but the squared Euclidean distance between the
            L2-normalised probability vectors, ||Ps/||Ps|| − Pt/||Pt|| ||² (= 2 − 2 cos, as BYOL's
            loss), with Pt after the chosen teacher operation and Ps = softmax(s/τs).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for "sinkhorn" (SwAV's 3).

    Shapes:
        forward(student_output (ncrops·B, K), teacher_output (G·B, K), epoch) -> scalar, where the
        chunks are in crop order [global 1, global 2, local 1, ...] and G (1 or 2) is the number of
        global views given to the teacher; teacher view i is never paired with student view i.

    After each forward, `last_stats` holds detached 0-dim tensors (no host sync) for collapse
    monitoring (paper Sec. 5.3, Fig. 7): "teacher_entropy" (mean per-sample entropy of Pt),
    "teacher_batch_entropy" (entropy of the batch-mean Pt, this rank), "student_entropy" (mean
    per-sample entropy of Ps over all crops), "kl" (KL(Pt‖Ps) averaged over pairs and samples),
    "teacher_temp". Entropies are in nats; log K is the uniform value.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_output: TeacherOutput = "centering",
        loss: LossKind = "ce",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if teacher_output not in TEACHER_OUTPUTS:
            raise ValueError(
                f"DINOLoss: unknown teacher_output {teacher_output!r}; valid: {', '.join(TEACHER_OUTPUTS)}"
            )
        if loss not in LOSSES:
            raise ValueError(f"DINOLoss: unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops must be >= 2 (no crop pair otherwise), got {ncrops}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"DINOLoss: sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        if student_temp <= 0 or teacher_temp <= 0 or warmup_teacher_temp <= 0:
            raise ValueError(
                f"DINOLoss: temperatures must be > 0, got student_temp={student_temp}, "
                f"teacher_temp={teacher_temp}, warmup_teacher_temp={warmup_teacher_temp}"
            )
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_output = teacher_output
        self.loss = loss
        self.sinkhorn_iterations = sinkhorn_iterations
        self.teacher_temp_schedule: np.ndarray = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}

    def teacher_probs(self, teacher_output: torch.Tensor, temp: float | torch.Tensor, n_global: int) -> torch.Tensor:
        """Targets Pt from teacher logits with the configured operation, detached.

        Args:
            teacher_output: (G·B, K) teacher logits.
            temp: τt.
            n_global: G, the number of teacher views (Sinkhorn runs per view).

        Returns:
            (G·B, K) float32 probabilities.
        """
        t = teacher_output.detach().float()
        if self.teacher_output == "centering":
            return F.softmax((t - self.center) / temp, dim=-1)
        if self.teacher_output == "softmax":
            return F.softmax(t / temp, dim=-1)
        views = t.chunk(n_global)
        return torch.cat([sinkhorn_knopp(v, temp, self.sinkhorn_iterations) for v in views])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                teacher_temp: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of Eq. 3 averaged over crop pairs and batch; then updates the center (Eq. 4).

        Args:
            student_output: (ncrops·B, K) student logits, views in crop order.
            teacher_output: (G·B, K) teacher logits of the G ∈ {1, 2} global views.
            epoch: index into the τt schedule (0 <= epoch < nepochs).
            teacher_temp: τt as a 0-dim tensor instead of the schedule's value for `epoch` (a
                step recorded as a CUDA graph reads each replay's τt from it).

        Returns:
            0-dim float32 loss.
        """
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(
                f"DINOLoss: epoch {epoch} outside the teacher temperature schedule of "
                f"{len(self.teacher_temp_schedule)} epochs (nepochs)"
            )
        n_student, k = student_output.shape
        if k != self.out_dim or teacher_output.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: outputs must have {self.out_dim} columns, got student "
                f"{tuple(student_output.shape)} and teacher {tuple(teacher_output.shape)}"
            )
        if n_student % self.ncrops:
            raise ValueError(
                f"DINOLoss: student_output has {n_student} rows, not a multiple of ncrops={self.ncrops}"
            )
        batch = n_student // self.ncrops
        n_global, rest = divmod(teacher_output.shape[0], batch) if batch else (0, 1)
        if rest or n_global not in (1, 2) or n_global > self.ncrops:
            raise ValueError(
                f"DINOLoss: teacher_output has {teacher_output.shape[0]} rows; expected 1 or 2 "
                f"global views of the batch size {batch} (student {n_student} rows / {self.ncrops} crops)"
            )
        temp = float(self.teacher_temp_schedule[epoch]) if teacher_temp is None else teacher_temp

        log_q = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        log_q = log_q.view(self.ncrops, batch, k)  # (V, B, K)
        p = self.teacher_probs(teacher_output, temp, n_global).view(n_global, batch, k)  # (G, B, K)
        n_pairs = n_global * (self.ncrops - 1)

        # Pairs (teacher view i, student view v != i). Σ_i Σ_{v≠i} <a_i, b_v> = <Σ_i a_i, Σ_v b_v> −
        # Σ_i <a_i, b_i>: two elementwise fp32 reductions over (B, K) instead of one per pair (the
        # reference's loop) or a matmul (which autocast/TF32 would run in reduced precision).
        ce = -_pair_sum(p, log_q) / (batch * n_pairs)
        if self.loss == "ce":
            total = ce
        else:
            s_hat = F.normalize(log_q.exp(), p=2, dim=-1)  # (V, B, K)
            t_hat = F.normalize(p, p=2, dim=-1)  # (G, B, K)
            # Σ_pairs ||ŝ_v − t̂_i||² = Σ_pairs ||ŝ_v||² + Σ_pairs ||t̂_i||² − 2 Σ_pairs <t̂_i, ŝ_v>
            s_sq = s_hat.square().sum(dim=(1, 2))  # (V,)
            partners = torch.full((self.ncrops,), float(n_global), device=s_sq.device)
            partners[:n_global] -= 1  # student view v < G is not paired with teacher view v
            sq = (
                (s_sq * partners).sum()
                + (self.ncrops - 1) * t_hat.square().sum()
                - 2 * _pair_sum(t_hat, s_hat)
            )
            total = sq / (batch * n_pairs)

        with torch.no_grad():
            self.last_stats = self._stats(p, log_q, ce.detach(), temp)
        self.update_center(teacher_output)
        return total

    @staticmethod
    def _stats(p: torch.Tensor, log_q: torch.Tensor, ce: torch.Tensor,
               temp: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Collapse diagnostics from (G, B, K) targets, (V, B, K) student log-probs, the pair-mean CE."""
        teacher_entropy = -torch.special.xlogy(p, p).sum(-1).mean()
        mean_p = p.flatten(0, 1).mean(0)
        # Every teacher view has ncrops − 1 partners, so mean KL(Pt‖Ps) = mean CE − mean H(Pt).
        return {
            "teacher_entropy": teacher_entropy,
            "teacher_batch_entropy": -torch.special.xlogy(mean_p, mean_p).sum(),
            "student_entropy": -(log_q.exp() * log_q).sum(-1).mean(),
            "kl": ce - teacher_entropy,
            "teacher_temp": torch.as_tensor(temp),
        }

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """c <- m·c + (1 − m)·mean over the global batch (all ranks) of the teacher logits (Eq. 4).

        Args:
            teacher_output: (G·B, K) teacher logits on this rank.
        """
        batch_center = teacher_output.detach().float().sum(dim=0, keepdim=True)
        _all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * _world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
