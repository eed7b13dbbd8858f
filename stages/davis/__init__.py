"""DAVIS-2017 semi-supervised video object segmentation (paper Table 5): label propagation with
frozen patch features and the benchmark's J&F scoring.

- `evaluate(davis_root, results_dir, sequences)`: score a results folder (stages.davis.evaluate;
  numpy only, no torch import).
- `run(params)` / `main(argv)`: the stage, `python -m stages.davis` (stages.davis.stage; imported
  on first use, so that scoring and the fixture generator do not load torch).
"""

from typing import Any

from stages.davis.evaluate import evaluate

__all__ = ["evaluate", "main", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "main"):
        from stages.davis import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'stages.davis' has no attribute {name!r}")
