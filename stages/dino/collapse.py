"""Collapse guard: DINO's two failure modes are visible in the teacher's output distribution.

- Uniform collapse: every teacher output is near uniform, mean per-sample entropy ≈ ln K (the loss
  then sits at ln K). Typical on small data when CLS features of different images are alike at
  initialisation, so the centred output carries no signal.
- Dominant collapse: one dimension wins for every image; the entropy of the batch-mean teacher
  distribution ≈ 0 (centering is meant to prevent it).

The guard counts consecutive logged steps in either state and warns (or stops) after
`patience` steps, naming the usual fixes.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

UNIFORM_FRACTION = 0.95  # per-sample entropy above this fraction of ln K
DOMINANT_FRACTION = 0.05  # batch-mean entropy below this fraction of ln K

FIXES = (  # what made small-data runs learn in EXPERIMENTS.md (g1-g3: local crops on 28² images collapsed)
    "usual fixes: use_bn_in_head: true, a smaller out_dim (e.g. 1024 on small data), "
    "a lower momentum_teacher for small batches (0.98-0.99), a higher lr, a sharper teacher "
    "(teacher_temp 0.04), fewer or no local crops on small images"
)


class CollapseError(RuntimeError):
    pass


class CollapseGuard:
    def __init__(self, out_dim: int, patience_steps: int, stop: bool):
        self.log_k = math.log(out_dim)
        self.patience = patience_steps
        self.stop = stop
        self.steps_collapsed = 0
        self.warned = False

    def state_dict(self) -> dict:
        return {"steps_collapsed": self.steps_collapsed, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.steps_collapsed, self.warned = state["steps_collapsed"], state["warned"]

    def diagnose(self, teacher_entropy: float, batch_mean_entropy: float) -> str | None:
        if teacher_entropy >= UNIFORM_FRACTION * self.log_k:
            return f"teacher outputs are near uniform (entropy {teacher_entropy:.3f} ≈ ln K = {self.log_k:.3f})"
        if batch_mean_entropy <= DOMINANT_FRACTION * self.log_k:
            return f"one output dimension dominates (entropy of the mean teacher output {batch_mean_entropy:.3f} ≈ 0)"
        return None

    def update(self, step: int, steps_seen: int, teacher_entropy: float, batch_mean_entropy: float) -> None:
        """Record `steps_seen` more steps at these entropies; warn or raise when collapsed too long."""
        if self.patience == 0:
            return
        problem = self.diagnose(teacher_entropy, batch_mean_entropy)
        self.steps_collapsed = self.steps_collapsed + steps_seen if problem else 0
        if problem and self.steps_collapsed >= self.patience:
            message = f"collapse at step {step}: {problem} for {self.steps_collapsed} steps; {FIXES}"
            if self.stop:
                raise CollapseError(message)
            if not self.warned:
                logger.warning(message)
                self.warned = True
