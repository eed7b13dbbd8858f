"""Per-iteration and per-epoch schedules, computed up front as arrays (reference utils.py).

Modules receive the values; they do not index epochs themselves (see STYLE.md). The learning rate,
weight decay and teacher momentum follow `cosine_scheduler` (paper Sec. 3.1 / Appendix: lr warm-up
for 10 epochs then cosine decay; wd 0.04 -> 0.4; teacher momentum 0.996 -> 1); the teacher
temperature follows `teacher_temp_schedule` (linear warm-up, then constant).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Linear warm-up then half-cosine decay, one value per iteration (reference semantics).

    The first `warmup_epochs * niter_per_ep` values are `np.linspace(start_warmup_value,
    base_value, warmup_iters)` (both ends included); value i of the remaining n iterations is
    `final + 0.5 * (base - final) * (1 + cos(pi * i / n))`, so it starts at `base_value` and
    approaches (without reaching) `final_value`.

    Args:
        base_value: value after warm-up (peak).
        final_value: value the cosine decays towards.
        epochs: number of epochs.
        niter_per_ep: iterations per epoch.
        warmup_epochs: epochs of linear warm-up (0: none; may equal `epochs`).
        start_warmup_value: first value of the warm-up.

    Returns:
        float64 array of shape (epochs * niter_per_ep,).

    Raises:
        ValueError: negative counts, or more warm-up epochs than epochs.
    """
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError(
            f"cosine_scheduler: epochs={epochs}, niter_per_ep={niter_per_ep} and "
            f"warmup_epochs={warmup_epochs} must be >= 0"
        )
    if warmup_epochs > epochs:
        raise ValueError(f"cosine_scheduler: warmup_epochs={warmup_epochs} > epochs={epochs}")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n = epochs * niter_per_ep - warmup_iters
    i = np.arange(n)
    # n == 0 (all warm-up): the empty array; avoid the 0/0 warning.
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(n, 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    logger.debug("cosine schedule %s -> %s over %d iterations", base_value, final_value, len(schedule))
    return schedule


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Teacher temperature per epoch (reference DINOLoss): linear warm-up, then constant.

    `np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)` followed by
    `teacher_temp` for the remaining `nepochs - warmup_teacher_temp_epochs` epochs. Paper: 0.04
    (warm-up from 0.04 to 0.07 over 30 epochs for ViT-S/16 at 300 epochs in the released configs).

    Returns:
        float64 array of shape (nepochs,).

    Raises:
        ValueError: warm-up longer than training, or negative counts.
    """
    if nepochs < 0 or warmup_teacher_temp_epochs < 0:
        raise ValueError(
            f"teacher_temp_schedule: nepochs={nepochs} and warmup_teacher_temp_epochs="
            f"{warmup_teacher_temp_epochs} must be >= 0"
        )
    if warmup_teacher_temp_epochs > nepochs:
        raise ValueError(
            f"teacher_temp_schedule: warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} "
            f"> nepochs={nepochs}"
        )
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.full(nepochs - warmup_teacher_temp_epochs, teacher_temp, dtype=np.float64),
        )
    )
