"""The teacher network's update rules (paper Sec. 3.1 and the Table 7 ablations)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θt ← λ θt + (1 − λ) θs for every parameter, with foreach kernels (no Python loop of
    small kernels). Buffers (BatchNorm statistics) are the teacher's own, as in the reference."""
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher = student (the 'student copy' and 'previous epoch' teachers of Table 7)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(s.detach())
