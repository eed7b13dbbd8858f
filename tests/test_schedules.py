"""Schedules against the reference formulas written out as plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.dino.schedules import cosine_scheduler, teacher_temp_schedule


def _cosine_loop(base, final, epochs, niter, warmup_epochs, start):
    """utils.cosine_scheduler of the reference, one iteration at a time."""
    warm = warmup_epochs * niter
    total = epochs * niter
    out = []
    for it in range(total):
        if it < warm:
            out.append(start + (base - start) * (it / (warm - 1) if warm > 1 else 0.0))
        else:
            i, n = it - warm, total - warm
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    return np.array(out)


@pytest.mark.parametrize(
    "base, final, epochs, niter, warmup, start",
    [
        (5e-4, 1e-6, 10, 7, 2, 0.0),  # lr: warm-up then cosine
        (0.04, 0.4, 6, 5, 0, 0.0),  # weight decay: increasing cosine, no warm-up
        (0.996, 1.0, 4, 3, 0, 0.0),  # teacher momentum
        (1.0, 0.0, 3, 4, 3, 0.5),  # all warm-up
        (1.0, 0.0, 3, 1, 1, 0.2),  # one iteration per epoch
        (2.0, 1.0, 2, 1, 1, 0.0),  # a single warm-up iteration (linspace of one value is its start)
    ],
)
def test_matches_reference_loop(base, final, epochs, niter, warmup, start) -> None:
    got = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
    assert got.shape == (epochs * niter,)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _cosine_loop(base, final, epochs, niter, warmup, start), rtol=0, atol=1e-15)


def test_landmarks() -> None:
    s = cosine_scheduler(1.0, 0.1, epochs=5, niter_per_ep=10, warmup_epochs=1, start_warmup_value=0.0)
    assert s[0] == 0.0
    assert s[9] == 1.0  # linspace includes its end point: the warm-up ends at the base value
    assert s[10] == 1.0  # the cosine starts at the base value too
    assert 0.1 < s[-1] < 0.1 + 0.45 * (1 - math.cos(math.pi / 40)) + 1e-12  # approaches but never reaches the final value
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) < 0)
    # the cosine half is symmetric around its middle value
    n = 40
    mid = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 20 / n))
    assert math.isclose(s[10 + 20], mid, rel_tol=1e-12)


def test_no_warmup_and_empty() -> None:
    s = cosine_scheduler(3.0, 1.0, epochs=2, niter_per_ep=2)
    np.testing.assert_allclose(s, [3.0, 1 + math.cos(math.pi / 4) + 1, 2.0, 1 + 1 + math.cos(3 * math.pi / 4)])
    assert cosine_scheduler(1.0, 0.0, epochs=0, niter_per_ep=5).shape == (0,)


def test_epochs_equal_warmup_is_pure_linear_warmup() -> None:
    with np.errstate(all="raise"):  # no 0/0 warning from an empty cosine part
        s = cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=2, start_warmup_value=0.0)
    np.testing.assert_allclose(s, np.arange(6) / 5)


@pytest.mark.parametrize("bad", [dict(warmup_epochs=4), dict(epochs=-1), dict(niter_per_ep=-2)])
def test_rejects_bad_counts(bad: dict) -> None:
    kwargs = dict(base_value=1.0, final_value=0.0, epochs=3, niter_per_ep=2) | bad
    with pytest.raises(ValueError, match="epochs|niter"):
        cosine_scheduler(**kwargs)


def test_teacher_temp_schedule() -> None:
    s = teacher_temp_schedule(0.04, 0.07, warmup_teacher_temp_epochs=4, nepochs=7)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07], rtol=1e-12)
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    np.testing.assert_allclose(teacher_temp_schedule(0.01, 0.02, 2, 2), [0.01, 0.02])
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, 5, 3)
