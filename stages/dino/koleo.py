"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2 on the student's CLS token):
the negative mean log distance of each L2-normalised feature to its nearest neighbour in the
batch. Minimising it spreads the features over the sphere, which the k-NN evaluation reads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """features: (B, D), B >= 2 -> scalar -mean_i log(||x_i - x_nn(i)|| + eps), x = features / ||features||.

    The neighbour is chosen without gradient (as DINOv2); the distance to it carries the gradient.
    """
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"koleo_loss: needs (B >= 2, D) features, got {tuple(features.shape)}")
    x = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
        nearest = similarity.argmax(dim=1)
    distances = (x - x[nearest] + eps).norm(dim=-1)  # eps as torch's PairwiseDistance: no NaN grad at 0
    return -torch.log(distances + eps).mean()
