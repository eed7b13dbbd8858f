"""Collapse guard: warns (or stops) after `patience` steps of a uniform or one-hot teacher."""

import logging
import math

import pytest

from stages.dino.collapse import CollapseError, CollapseGuard

LOG_K = math.log(1024)


def test_uniform_teacher_warns_once_after_patience(caplog):
    guard = CollapseGuard(1024, patience_steps=30, stop=False)
    with caplog.at_level(logging.WARNING):
        for step in range(0, 50, 10):
            guard.update(step, 10, teacher_entropy=0.99 * LOG_K, batch_mean_entropy=LOG_K)
    warnings = [r for r in caplog.records if "collapse" in r.message]
    assert len(warnings) == 1
    assert "near uniform" in warnings[0].message and "use_bn_in_head" in warnings[0].message


def test_dominant_dimension_stops_when_asked():
    guard = CollapseGuard(1024, patience_steps=20, stop=True)
    guard.update(0, 10, teacher_entropy=0.01, batch_mean_entropy=0.01)
    with pytest.raises(CollapseError, match="one output dimension dominates"):
        guard.update(10, 10, teacher_entropy=0.01, batch_mean_entropy=0.01)


def test_healthy_steps_reset_the_count_and_state_round_trips():
    guard = CollapseGuard(1024, patience_steps=30, stop=True)
    guard.update(0, 20, teacher_entropy=LOG_K, batch_mean_entropy=LOG_K)
    guard.update(20, 10, teacher_entropy=2.0, batch_mean_entropy=5.0)  # learning: per-sample sharp, batch spread
    assert guard.steps_collapsed == 0
    other = CollapseGuard(1024, patience_steps=30, stop=True)
    guard.update(30, 20, teacher_entropy=LOG_K, batch_mean_entropy=LOG_K)
    other.load_state_dict(guard.state_dict())
    with pytest.raises(CollapseError):
        other.update(50, 10, teacher_entropy=LOG_K, batch_mean_entropy=LOG_K)


def test_patience_zero_disables():
    guard = CollapseGuard(1024, patience_steps=0, stop=True)
    guard.update(0, 1000, teacher_entropy=LOG_K, batch_mean_entropy=LOG_K)
