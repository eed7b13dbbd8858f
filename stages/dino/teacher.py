"""The teacher network's update rules (paper Sec. 3.1 and the Table 7 ablations)."""

from __future__ import annotations

import torch
from torch import nn


def paired_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list, list]:
    """The teacher's parameters and the student's of the same names (the student may have more:
    the predictor of the Table 7 ablation has no teacher counterpart)."""
    student_params = dict(student.named_parameters())
    pairs = [(t, student_params.get(name)) for name, t in teacher.named_parameters()]
    missing = [name for (name, _), (_, s) in zip(teacher.named_parameters(), pairs) if s is None]
    if missing:
        raise ValueError(f"the student has no parameters named {missing[:5]}")
    return [t for t, _ in pairs], [s.detach() for _, s in pairs]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """θt ← λ θt + (1 − λ) θs for every teacher parameter, with foreach kernels (no Python loop
    of small kernels). Buffers (BatchNorm statistics) are the teacher's own, as in the reference.
    λ may be a 0-dim tensor on the device (a step recorded as a CUDA graph reads it per replay)."""
    teacher_params, student_params = paired_parameters(teacher, student)
    torch._foreach_mul_(teacher_params, momentum)
    if isinstance(momentum, torch.Tensor):
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - momentum))
    else:
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher = student (the 'student copy' and 'previous epoch' teachers of Table 7)."""
    teacher_params, student_params = paired_parameters(teacher, student)
    torch._foreach_copy_(teacher_params, student_params)
