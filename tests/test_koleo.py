"""The KoLeo term against an independent formula (scipy's pairwise distances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from stages.dino.koleo import koleo_loss


def reference_koleo(features: np.ndarray) -> float:
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = cdist(x, x)
    np.fill_diagonal(distances, np.inf)
    return float(-np.log(distances.min(axis=1)).mean())


def test_matches_nearest_neighbour_log_distance():
    features = torch.randn(33, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(koleo_loss(features)) == pytest.approx(reference_koleo(features.numpy()), rel=1e-6)


def test_scale_invariant_and_by_hand():
    # Unit vectors at 0°, 90°, 180°: every nearest neighbour is 90° away, distance sqrt(2).
    features = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0]])
    assert float(koleo_loss(features)) == pytest.approx(-np.log(np.sqrt(2)), rel=1e-5)


def test_spreading_lowers_it_and_duplicates_stay_finite():
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    assert float(koleo_loss(spread)) < float(koleo_loss(close))
    duplicates = torch.ones(4, 3, requires_grad=True)
    loss = koleo_loss(duplicates)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(duplicates.grad).all()


def test_needs_two_samples():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
